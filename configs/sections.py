"""Every config section with its defaults, one function per section: configs/base.py composes
them into a stage config, configs/demo.py into a pipeline config.

The code that reads a section checks it (train/validate.py, rl/config.py, train/pipeline.py);
the keys and their defaults live only here. Each function returns a fresh ConfigDict.
"""
import ml_collections

LORA_TARGETS = (r"attn/qkv$", r"attn/out$", r"mlp/gate_up$", r"mlp/down$")  # model/lora.py kernels
TOKENIZER_TRAINING_CHARS = 20_000_000  # tokenizer training text, from the start of the train split
# The reward functions of rl/rewards.py (REWARD_FUNCTIONS): `config.rl.rewards.<name>` is a weight.
REWARD_NAMES = ("answer_match", "format", "answer_tag", "numeric_closeness", "length_penalty")


def _section(**keys) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(keys)


def profile() -> ml_collections.ConfigDict:
  """A jax.profiler trace of a few steps (train/profile.py)."""
  return _section(
      start_step=0,                    # first step recorded, as logged (step 1 compiles); 0 = off
      num_steps=3,
  )


def mesh() -> ml_collections.ConfigDict:
  """Device mesh axes; -1 = every device left (model/sharding.py)."""
  return _section(data=-1, fsdp=1, tensor=1,
                  sequence=1)                  # > 1: each row's tokens split (context parallelism)


def optim() -> ml_collections.ConfigDict:
  """The optimizer and its schedule (train/optim.py)."""
  return _section(
      name="adamw", lr=3e-3, warmup_steps=100, schedule="cosine", end_lr_frac=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum=1)


def lora() -> ml_collections.ConfigDict:
  """Low-rank adapters (model/lora.py)."""
  return _section(
      rank=0,                          # 0 = full fine-tuning; > 0 = train adapters only
      alpha=16.0,                      # adapter scale is alpha / rank
      targets=list(LORA_TARGETS),      # regexes over parameter paths
      base_dtype="float32",            # the frozen base in the step: float32 | bfloat16
      quantize="none",                 # the base's layer kernels: none | int8 | nf4 (QLoRA), model/quant.py
      block_size=64,                   # entries per quantization scale (absmax), along the input axis
  )


def reward() -> ml_collections.ConfigDict:
  """Objective reward_model (docs/algorithms.md, "Reward model")."""
  return _section(
      loss="bradley_terry",            # bradley_terry | margin_ranking
      margin=0.0,                      # r_w - r_l target margin
      centering=0.0,                   # + centering * mean((r_w + r_l)^2)
      logp_weight=0.0,                 # score + logp_weight * mean log-prob of the completion's tokens
                                       # under the model's own LM head (model/heads.py reward_score)
  )


def dpo() -> ml_collections.ConfigDict:
  """Objective dpo (docs/algorithms.md, "DPO family")."""
  return _section(
      loss="sigmoid",                  # sigmoid | cdpo | robust | ipo | simpo | orpo
      beta=0.1,
      label_smoothing=0.0,             # eps of sigmoid / cdpo / robust
      gamma=0.5,                       # simpo target margin
      orpo_lambda=0.1,                 # orpo weight of the odds-ratio term
      rpo_alpha=0.0,                   # + rpo_alpha * average NLL of the chosen answer (RPO)
      precompute_reference=False,      # reference log-probs once before training (cached in workdir)
  )


def data() -> ml_collections.ConfigDict:
  """Where documents come from and how they become rows (train/data.py, train/sources.py)."""
  return _section(
      source="builtin",       # builtin | text | jsonl | parquet | hf_disk (a datasets save_to_disk dir) | tfds
      path="",                # file or glob (text, jsonl, parquet, hf_disk, local tfds)
      eval_path="",           # held-out file or glob; '' = hold out every 50th document
      tfds_name="",           # registered TFDS name; '' = build `KilnFiles` from path
      tfds_data_dir="",       # TFDS data_dir for tfds_name; '' = TFDS default
      tfds_split="train",
      tfds_eval_split="",     # '' = 'eval' of a local build with eval_path, else hold out
      text_key="text",        # pretraining text field in jsonl / tfds records
      num_documents=20000,    # builtin: number of generated problems
      builtin_slip=0.0,       # builtin sft: fraction of solutions by a sloppy demonstrator who forgets every
                              # carry and borrow (49 + 84 = 123) and divides one too high (12 / 3 = 5);
                              # pretraining, held-out problems, pairs and RL prompts stay right: imitation
                              # learns the slip, a verifier's reward does not (train/corpus.py)
      max_documents=0,        # text/jsonl/tfds: read at most this many per split; 0 = all
      cache_dir="",           # '' = ~/.cache/kiln
      chat_template="chatml",  # chatml | llama2 | hf (the tokenizer's own jinja template): all but pretrain
      train_on_prompt=False,  # sft: loss on every token instead of assistant tokens only
      pipeline="cache",       # cache: tokenize + pack the split once into rows on disk, shuffled per epoch;
                              # stream (pretrain, sft, reward_model, dpo): each process packs its own shard as it
                              # trains (train/stream.py)
      workers=0,              # stream: processes tokenizing records (same batches for any number); 0 = the
                              # pipeline's own thread (train/workers.py)
      pair_rows=0,            # reward_model, dpo: pack each step's batch_size pairs into this many rows of
                              # 2 seq_len tokens, several pairs a row (each its own segment), best fit; a
                              # pair that fits no row waits for the next step (train/pairs.py plan);
                              # 0 = one row per pair
      overlong="drop",        # an sft conversation or preference pair longer than seq_len (an rl jsonl
                              # prompt longer than rl.max_prompt_len): drop | truncate (keep what fits)
  )


def tokenizer() -> ml_collections.ConfigDict:
  """path '' = the init_from run's, else train one with vocab config.model.vocab_size (train/data.py);
  a run stores its tokenizer in DIR/tokenizer/ and keeps it (train/init_source.py `tokenizer`)."""
  return _section(
      path="",
      max_training_chars=TOKENIZER_TRAINING_CHARS,  # train on the first N characters of the corpus; 0 = all
  )


def rl() -> ml_collections.ConfigDict:
  """The online RL stages (objective grpo | rloo | gspo | ppo; rl/config.py checks it).

  Units: `config.steps` counts iterations (one rollout, then `num_iterations` passes of
  `num_minibatches` optimizer updates over it); `config.batch_size` counts completions per
  iteration (prompts per iteration = batch_size // num_generations), as TRL counts them.
  log_every / eval_every / checkpoint_every count iterations too.
  """
  return _section(
      # prompts
      prompts="builtin",          # builtin (fresh train_problems every iteration) | jsonl | parquet | hf_disk
      prompts_path="",            # file or glob: {"prompt": str | [...]} or {"messages": [...]}, optional "answer"
      eval_path="",               # held-out {"prompt", "answer"} records, in rl.prompts's format (builtin:
                                  # jsonl); '' = builtin held-out
      num_eval_problems=200,      # held-out problems per eval (greedy accuracy); 0 = no eval
      eval_at_start=True,         # also evaluate before the first update (the baseline)
      max_prompt_len=64,          # prompts are left-padded to this width, cut from the left if longer
      # sampling
      num_generations=8,          # G completions per prompt
      oversample=1.0,             # GRPO family: sample ceil(oversample x prompts) groups per iteration and
                                  # train on a prompts' worth, those with reward spread first (rl/grpo.py
                                  # `spread_first`; DAPO's dynamic sampling, one round); 1 = off. The
                                  # train/reward metrics stay every sampled completion's
      max_new_tokens=48,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      # rewards: weight of every reward function of rl/rewards.py (0 = off) and of a reward model
      rewards=_section(**{name: 0.0 for name in REWARD_NAMES}),
      reward_model="",            # a reward_model run's workdir; its score is added with the weight below
      reward_model_weight=1.0,
      missing_eos_penalty=0.0,    # subtracted from the score of completions that never stopped
      # KL to the reference (init_from, or the LoRA base)
      beta=0.04,                  # initial KL coefficient; 0 = no reference model at all
      kl_estimator="k3",          # k1 | k2 | k3 (docs/algorithms.md, "KL")
      kl_placement="",            # in_loss | in_reward; '' = grpo in_loss, ppo in_reward
      kl_target=0.0,              # > 0: adaptive beta toward this KL (nats per completion)
      kl_horizon=10000,
      # updates
      num_iterations=1,           # passes over each rollout with pi_old fixed (PPO epochs)
      num_minibatches=1,          # optimizer updates per pass (GRPO: whole groups per minibatch)
      eps_low=0.2,                # clip range (PPO uses eps_low)
      eps_high=0.2,               # GRPO upper clip (DAPO: 0.28)
      # GRPO
      scale="",                   # group | batch | none (Dr. GRPO); '' = group (grpo), none (rloo)
      estimator="grpo",           # grpo | rloo
      ratio_level="token",        # token | sequence (GSPO)
      loss_agg="grpo",            # grpo | token_mean | bnpo | dr_grpo
      # PPO
      value_model="critic",       # critic (separate model) | policy (a head on the policy trunk)
      value_init_from="",         # critic / head start: '' = reward_model if set, else init_from
      critic_lr=0.0,              # the critic's peak lr (optim's schedule shape); 0 = config.optim.lr
      gamma=1.0,
      lam=0.95,
      value_clip=0.2,
      vf_coef=0.1,
      ent_coef=0.0,
      whiten_rewards=False,
      whiten_advantages=True,
      # logging
      num_samples_to_log=2,       # completions written to samples.jsonl per logged iteration
  )


def eval() -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """The evaluation suite of one run (eval/suite.py, `python -m eval`)."""
  return _section(
      num_problems=200,     # held-out problems asked (greedy, sampled, KL)
      samples=4,            # sampled answers per problem for pass@k (0 = greedy only)
      temperature=0.8,
      max_new_tokens=80,    # the longest built-in solution is 74 tokens
      perplexity_batches=8,
      seed=0,
  )


def pipeline() -> ml_collections.ConfigDict:
  """A pipeline config (train/pipeline.py): the stage sections to run in order, each a full stage
  config added under its name, then the evaluation of every stage."""
  c = _section(stages=[])
  c.eval = eval()
  c.eval.reference = ""      # the stage KL and win rate are measured against ('' = neither)
  c.eval.reward_model = ""   # the reward_model stage that judges reward and win rate
  return c
