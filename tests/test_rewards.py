"""rl/rewards.py: docs/algorithms.md worked examples and a NumPy reference for the DAPO penalty."""
import numpy as np
import pytest

from rl import rewards


def test_answer_match_two_plus_two():
  # "What is 2+2?": any completion whose final answer is 4 scores 1, whatever the reasoning.
  good = ["2 plus 2 makes 4", "Step by step: 2 + 2 = 4. <answer>4</answer>",
          "<reasoning>1+1+1+1</reasoning><answer>4.0</answer>", "I guess 5... no, it is 4.",
          "<answer> 4 </answer>"]
  bad = ["2 + 2 = 5", "<answer>5</answer> though 4 appears in text 4", "no idea", ""]
  got = rewards.answer_match(good + bad, ["4"] * len(good) + [4] * len(bad))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [1] * len(good) + [0] * len(bad))


def test_extract_answer():
  assert rewards.extract_answer("a <answer>7</answer> b <answer> 9 </answer>") == "9"
  assert rewards.extract_answer("costs $1,250 and then 3.5 more") == "3.5"
  assert rewards.extract_answer("no numbers") is None
  np.testing.assert_array_equal(rewards.answer_match(["<answer>1,000</answer>", "<answer>Paris</answer>"],
                                                     ["1000", "paris"]), [1, 1])


def test_format_reward_worked_example():
  completions = ["<reasoning>2+2=4</reasoning>\n<answer>4</answer>",
                 "<reasoning>2+2=4</reasoning> so 4", "2+2 is <answer>4</answer>", "4"]
  np.testing.assert_array_equal(rewards.format_reward(completions), [1.0, 0.5, 0.5, 0.0])


def test_answer_tag_reward():
  completions = ["2 + 2 = 4 <answer>4</answer>", "<answer> -3.5 </answer>", "<answer>four</answer>",
                 "<answer>4</answer><answer>4</answer>", "<answer>4", "4"]
  np.testing.assert_array_equal(rewards.answer_tag_reward(completions), [1, 1, 0, 0, 0, 0])


def test_numeric_closeness_target_4():
  completions = ["<answer>4</answer>", "<answer>5</answer>", "3.5", "<answer>6</answer>", "x=100", "none"]
  got = rewards.numeric_closeness(completions, ["4"] * 6, width=1.0)
  np.testing.assert_allclose(got, [1.0, 0.5, 0.75, 0.0, 0.0, 0.0], rtol=1e-6)


def test_length_penalty_matches_numpy():
  max_len, cache = 100, 20
  lengths = np.random.default_rng(0).integers(50, 130, 40)
  want = [0.0 if n <= 80 else (-1.0 if n > 100 else (80 - n) / 20) for n in lengths]
  np.testing.assert_allclose(rewards.length_penalty(lengths, max_len, cache), want, rtol=1e-6)
  np.testing.assert_allclose(rewards.length_penalty([80, 90, 100], 100, 20), [0, -0.5, -1], atol=1e-7)


def test_combined_reward():
  completions = ["<reasoning>r</reasoning><answer>4</answer>", "<answer>6</answer>"]
  total, parts = rewards.combined_reward({"answer_match": 1.0, "format": 0.5, "length_penalty": 1.0},
                                         completions, ["4", "4"], lengths=[10, 95], max_len=100)
  np.testing.assert_allclose(parts["length_penalty"], [0.0, -0.75], rtol=1e-6)  # cache = 20
  np.testing.assert_allclose(total, [1.0 + 0.5, 0.0 + 0.25 - 0.75], rtol=1e-6)
  assert total.dtype == np.float32 and set(parts) == {"answer_match", "format", "length_penalty"}
  assert set(rewards.REWARD_FUNCTIONS) >= {"answer_match", "format", "answer_tag", "numeric_closeness"}
  with pytest.raises(ValueError):
    rewards.combined_reward({"nope": 1.0}, completions, ["4", "4"])
