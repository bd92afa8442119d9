"""The configs of the command-line tools that act on a run directory (`--workdir DIR`), with their
defaults; every option is `--config.KEY=VALUE`, as for `python -m train`:

  python -m eval --workdir DIR --config.reference=SFT_DIR --config.reward_model=RM_DIR
  python -m eval.sample --workdir DIR --config.prompts="'What is 2 + 2?'" --config.chat=True
  python -m eval.tasks --workdir DIR --config.task=arith --config.samples=4
  python -m eval.preference --workdir DIR --config.data=pairs.jsonl
  python -m train.rundir --workdir DIR --config.import_hf=HF_DIR     # or --config.export_hf=HF_DIR

Several prompts: repeat the flag (`--config.prompts=a --config.prompts=b`) or give a tuple
(`--config.prompts="('a', 'b')"`); a prompt with spaces needs its own quotes, as above.
"""
import ml_collections

from configs import sections


def evaluate() -> ml_collections.ConfigDict:
  """`python -m eval`: the suite's row of one run (eval/suite.py)."""
  c = sections.eval()
  c.reference = ""          # run to measure KL and win rate against (the SFT run)
  c.reward_model = ""       # reward_model run that judges reward and win rate
  return c


def sample() -> ml_collections.ConfigDict:
  """`python -m eval.sample`: completions of a run's latest (or given) checkpoint."""
  return ml_collections.ConfigDict(dict(
      prompts=("What is 2 + 2?",),
      chat=False,             # wrap in the chat template, stop at the end of the turn
      num=1,                  # samples per prompt
      temperature=1.0,        # 0 = greedy
      top_p=1.0,
      top_k=0,
      max_new_tokens=64,
      seed=0,
      step=-1,                # checkpoint step; -1 = the latest
      beam=0,                 # beam width; 0 = sample
  ))


def tasks() -> ml_collections.ConfigDict:
  """`python -m eval.tasks`: held-out accuracy of a run's generated answers (eval/tasks.py)."""
  return ml_collections.ConfigDict(dict(
      task="arith",
      num=200,                # held-out problems to ask
      samples=0,              # k sampled answers per problem (pass@k)
      temperature=0.8,
      top_p=1.0,
      max_new_tokens=80,
      chat="auto",            # auto (every objective but pretrain) | yes | no
  ))


def preference() -> ml_collections.ConfigDict:
  """`python -m eval.preference`: pair accuracy of a reward_model or dpo run."""
  return ml_collections.ConfigDict(dict(
      data="",                # JSONL pairs / rankings; '' = the run's held-out pairs
      step=-1,                # checkpoint step; -1 = the latest
  ))


def convert() -> ml_collections.ConfigDict:
  """`python -m train.rundir`: Hugging Face import into / export from a run directory."""
  return ml_collections.ConfigDict(dict(
      import_hf="",           # a HF directory -> a new run in --workdir
      export_hf="",           # --workdir's latest params (LoRA merged) -> this HF directory
      max_shard_mb=2048.0,    # export shard size
      dtype="",               # export dtype; '' = the params' own
  ))
