"""Arguments of ``flagm3 train``, named as FlagEmbedding's M3 fine-tuning arguments where the concept is shared,
so an existing launch script ports by changing the module name. Parsed with ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional

from transformers import TrainingArguments

from .compat import TRANSFORMERS_5, after_training_arguments, before_training_arguments
from .losses import M3LossConfig
from .recipe import RECIPE_ATTENTION_DROPOUT as RECIPE_ATTENTION_DROPOUT  # re-exported: the recipe's table
from .recipe import Recipe
from .scoring import HEADS


def parse_weights(text: Optional[str], name: str) -> Optional[Dict[str, float]]:
    """``"dense=1,sparse=0.3"`` -> ``{"dense": 1.0, "sparse": 0.3}``; ``None``/empty -> ``None``."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            weights[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--{name}: expected 'head=number,...', got {text!r}")
    return weights


@dataclass
class M3ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "An encoder (fresh heads), a BGE-M3-layout directory, or a flagm3 checkpoint."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where hub downloads are cached."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the model repository."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Load the fast (Rust) tokenizer if there is one."})
    colbert_dim: Optional[int] = field(
        default=None,
        metadata={"help": "ColBERT vector size of fresh heads (-1 or unset: the hidden size). A checkpoint keeps "
                  "its own (M3Config.colbert_dim); a different explicit value is refused."},
    )
    sparse_init: str = field(
        default="auto",
        metadata={
            "help": "Fresh sparse head: 'idf' fits it to the training passages' IDF, 'none' keeps the random "
            "init, 'auto' does 'idf' when starting from a plain encoder (a checkpoint keeps its trained head).",
            "choices": ["auto", "idf", "none"],
        },
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (default: the backbone's choice)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the encoder; heads fully."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={
        "help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default=r".*encoder\..*(query|key|value|dense)$",
        metadata={"help": "Regex of encoder Linear layers that get adapters."},
    )


@dataclass
class M3DataArguments:
    train_data: List[str] = field(
        default_factory=list, metadata={"help": "JSONL files or directories (one dataset per file); hf:ID for a datasets id.",
                                        "nargs": "+"}
    )
    cache_path: Optional[str] = field(
        default=None,
        metadata={"help": "Where the validated training data is kept as memory-mapped Arrow files, reused while the "
                  "files are unchanged, with the fresh sparse head fitted to it (default: flagm3-prepared in the "
                  "datasets cache)."},
    )
    train_group_size: int = field(default=8, metadata={"help": "Passages per query: 1 positive + negatives."})
    query_max_len: int = field(default=32, metadata={"help": "Queries are truncated to this many tokens."})
    passage_max_len: int = field(default=128, metadata={"help": "Passages are truncated to this many tokens."})
    pad_to_multiple_of: Optional[int] = field(default=None, metadata={
        "help": "Pad each batch's length up to a multiple of this (tensor-core friendly shapes)."})
    max_example_num_per_dataset: Optional[int] = field(default=None, metadata={
        "help": "Subsample each dataset (file) to at most this many records (seeded)."})
    query_instruction_for_retrieval: Optional[str] = field(default=None, metadata={
        "help": "Instruction put before every query (a record's `prompt` takes precedence)."})
    query_instruction_format: str = field(default="{}{}", metadata={
        "help": "Format of instruction and query, `{}{}` = instruction then query; `\\n` is a newline."})
    passage_instruction_for_retrieval: Optional[str] = field(default=None, metadata={
        "help": "Instruction put before every passage."})
    passage_instruction_format: str = field(default="{}{}", metadata={"help": "Format of instruction and passage."})
    knowledge_distillation: bool = field(default=False, metadata={"help": "Distil pos_scores/neg_scores."})
    same_dataset_within_batch: bool = field(default=False, metadata={
        "help": "Every batch draws from one dataset (file) only."})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch records of similar passage length (less padding; changes who the in-batch negatives "
                  "are). Off by default: random batches, as FlagEmbedding's."},
    )
    sample_negatives_from_corpus: bool = field(
        default=True, metadata={"help": "Records without negatives get some from other records."}
    )
    eval_data: Optional[str] = field(default=None, metadata={"help": "BEIR-layout directory for evaluation."})
    eval_split: str = field(default="dev", metadata={
        "help": "Split of `--eval_data` to evaluate on (`qrels/<split>.tsv`)."})
    eval_max_corpus_size: Optional[int] = field(default=None, metadata={
        "help": "Evaluate on a seeded subset of the corpus of this size (judged documents kept)."})
    eval_max_length: int = field(default=512, metadata={"help": "Maximum passage length when evaluating."})
    general_eval_data: List[str] = field(
        default_factory=list,
        metadata={"help": "General-domain BEIR-layout directories evaluated beside --eval_data at step 0 and at the "
                  "end (the before -> after table): the forgetting guard.", "nargs": "+"},
    )
    general_eval_split: str = field(default="dev", metadata={"help": "The qrels split of --general_eval_data."})


@dataclass
class M3TrainingArguments(TrainingArguments):
    # --- FlagEmbedding names
    negatives_cross_device: bool = field(default=False, metadata={"help": "Negatives from every process."})
    temperature: float = field(default=0.02, metadata={
        "help": "Temperature of every head's scores (see `--loss_preset`, `--head_temperatures`)."})
    fix_position_embedding: bool = field(default=False, metadata={"help": "Freeze the encoder's position embeddings."})
    sentence_pooling_method: Optional[str] = field(
        default=None,
        metadata={
            "help": "Dense pooling (cls, mean, last_token). Default: the checkpoint's own (M3Config.pooling); cls "
            "for fresh heads on a plain encoder. Given explicitly, it overrides the checkpoint's.",
            "choices": ["cls", "mean", "last_token"],
        },
    )
    normalize_embeddings: Optional[bool] = field(
        default=None,
        metadata={"help": "L2-normalise dense and ColBERT vectors. Default: the checkpoint's own "
                  "(M3Config.normalize_embeddings); True for fresh heads. Given explicitly, it overrides the checkpoint's."},
    )
    sub_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Cached-gradient (GradCache) training in chunks of this many texts."}
    )
    kd_loss_type: str = field(default="kl_div", metadata={
        "choices": ["kl_div", "m3_kd_loss"],
        "help": "Teacher-score distillation loss (with `--knowledge_distillation`)."})
    unified_finetuning: bool = field(default=True, metadata={"help": "Train sparse and ColBERT heads too."})
    use_self_distill: bool = field(default=True, metadata={"help": "Distil the ensemble's scores into each head."})
    self_distill_start_step: int = field(default=-1, metadata={
        "help": "Self-distillation starts after this global step."})
    fix_encoder: bool = field(default=False, metadata={"help": "Train the heads only."})
    if not TRANSFORMERS_5:  # 4.x's own sampler option: M3Trainer groups by M3DataArguments.group_by_length instead
        group_by_length: bool = field(default=False, init=False)
        warmup_steps: float = field(  # 4.x: an int; a fraction as in 5.x (compat.before_training_arguments)
            default=0, metadata={"help": "Linear warmup steps; a value below 1 is a fraction of the total steps."}
        )
    # --- flagm3 additions
    loss_preset: str = field(
        default="flagm3",
        metadata={
            "help": "bge-m3: the published objective exactly; flagm3 (measured default): every head trained, the "
            "sparse head by its own in-batch term on detached hidden states (docs/heads-and-loss.md)."
        },
    )
    heads: Optional[str] = field(default=None, metadata={"help": "Heads to train, e.g. 'dense,sparse'."})
    head_loss_weights: Optional[str] = field(
        default=None, metadata={"help": "e.g. 'dense=1,sparse=0.1,colbert=1,ensemble=1'."}
    )
    ensemble_weights: Optional[str] = field(default=None, metadata={"help": "e.g. 'dense=1,sparse=0.3,colbert=1'."})
    self_distill_weights: Optional[str] = field(default=None, metadata={"help": "e.g. 'dense=1,sparse=0.1'."})
    head_temperatures: Optional[str] = field(default=None, metadata={"help": "e.g. 'sparse=0.05'."})
    head_learning_rate: Optional[float] = field(default=None, metadata={"help": "Learning rate of the heads."})
    sparse_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the sparse head (default: head_learning_rate)."}
    )
    teacher_temperature: Optional[float] = field(
        default=None,
        metadata={"help": "Teacher scores become softmax(scores / teacher_temperature). Default 1 (reranker "
                  "logits, as FlagEmbedding's data has them; `flagm3 mine --teacher-scores` writes such logits)."},
    )
    sparse_stop_gradient: Optional[bool] = field(
        default=None,
        metadata={"help": "The sparse head reads detached hidden states: its loss terms train the head, not the "
                  "encoder. Default: the recipe's."},
    )
    sparse_hard_negatives: Optional[bool] = field(
        default=None,
        metadata={"help": "False: the sparse head's own InfoNCE leaves out each query's hard negatives (in-batch "
                  "negatives only). Default: the recipe's."},
    )
    sparse_anchor_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the sparse head's squared relative distance to its initial (IDF-fitted) "
                  "parameters. Default: the recipe's."},
    )
    use_mrl: bool = field(
        default=False,
        metadata={"help": "Matryoshka training (FlagEmbedding's name): on when --mrl_dims is given; --use_mrl alone "
                  "trains at 256 and 512 dimensions (MRL_DEFAULT_DIMS)."},
    )
    mrl_dims: Optional[List[int]] = field(
        default=None,
        metadata={"help": "Matryoshka training: the dense and ColBERT InfoNCE terms also on these leading dimensions "
                  "(each capped at the head's size), e.g. 96 192 384; ensemble and self-distillation stay at full "
                  "size (flagm3.losses.matryoshka).", "nargs": "+"},
    )
    mrl_weights: Optional[List[float]] = field(
        default=None, metadata={"help": "Weight of each --mrl_dims term (default 1 each).", "nargs": "+"}
    )
    colbert_pool_factor: Optional[int] = field(
        default=None,
        metadata={"help": "Pooling-aware ColBERT training: passages' token vectors pooled by this factor "
                  "(hierarchical clustering, as the encode-time pool factor) in every ColBERT score. Default 1."},
    )
    sparse_flops_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the FLOPS regulariser on the passages' sparse weights (fewer active tokens "
                  "per passage; flagm3.losses.flops). Default 0 (off)."},
    )
    sparse_flops_target: Optional[float] = field(
        default=None,
        metadata={"help": "Apply the FLOPS regulariser only while passages have more active tokens than this "
                  "on average (default: always)."},
    )
    max_length_chunks: int = field(
        default=4,
        metadata={
            "help": "Encode each side of a batch in at most this many length-sorted chunks, each padded only to "
            "its own longest text: the same outputs for fewer padded tokens. 1 turns it off."
        },
    )
    attention_dropout: Optional[float] = field(
        default=None,
        metadata={
            "help": "Dropout on the encoder's attention probabilities during training. Default: the recipe's "
            "(RECIPE_ATTENTION_DROPOUT): 0 with loss_preset flagm3 (fused attention kernels: faster, leaner), the "
            "encoder's own with bge-m3 (as FlagEmbedding trains)."
        },
    )
    recompute_attention: bool = field(
        default=False,
        metadata={
            "help": "Recompute attention probabilities in the backward pass instead of storing them (less memory "
            "with attention dropout on CPU, more step time: see docs/performance.md)."
        },
    )
    save_bge_m3_layout: bool = field(
        default=False, metadata={"help": "Also write the original BGE-M3 layout to <output_dir>/bge-m3."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many consecutive steps with a non-finite loss/gradient."}
    )
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Trainer setting; flagm3 needs it off (its batches are nested dicts)."})
    before_after_eval: bool = field(
        default=True,
        metadata={"help": "With --eval_data or --general_eval_data: evaluate every head at step 0 and at the end, "
                  "and report before -> after per head with a paired significance test (docs/diagnosing.md)."},
    )
    alarms: bool = field(
        default=True,
        metadata={"help": "Warn, naming cause and remedy, when a loss term stays near 0, nothing trains, the eval "
                  "embeddings stay step 0's, or an eval metric falls twice in a row (docs/diagnosing.md)."},
    )
    false_negative_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Mask, in every InfoNCE term, in-batch passages whose dense cosine similarity to a "
                  "query's positive is at least this (near-duplicates of the positive: likely false negatives), "
                  "e.g. 0.95. Default: off."},
    )

    def __post_init__(self) -> None:
        before_training_arguments(self)  # transformers 4.x differences (flagm3.compat)
        super().__post_init__()
        after_training_arguments(self)

    def loss_config(self, preset: Optional[str] = None) -> M3LossConfig:
        """The objective these arguments describe: the preset (``--loss_preset`` unless ``preset`` is given),
        then every explicitly given knob."""
        if self.heads:
            heads = tuple(h.strip() for h in self.heads.split(",") if h.strip())
        else:
            heads = HEADS if self.unified_finetuning else ("dense",)
        config = M3LossConfig.preset(
            preset or self.loss_preset,
            heads=heads,
            temperature=self.temperature,
            use_self_distill=self.use_self_distill,
            self_distill_start_step=self.self_distill_start_step,
            kd_loss_type=self.kd_loss_type,
            teacher_temperature=self.teacher_temperature,
            sparse_stop_gradient=self.sparse_stop_gradient,
            sparse_hard_negatives=self.sparse_hard_negatives,
            sparse_anchor_weight=self.sparse_anchor_weight,
            false_negative_threshold=self.false_negative_threshold,
            mrl_dims=tuple(self.mrl_dims) if self.mrl_dims else (MRL_DEFAULT_DIMS if self.use_mrl else None),
            mrl_weights=tuple(self.mrl_weights) if self.mrl_weights else None,
            normalize_compressed=self.normalize_embeddings is not False,
            colbert_pool_factor=self.colbert_pool_factor,
            sparse_flops_weight=self.sparse_flops_weight,
            sparse_flops_target=self.sparse_flops_target,
        )
        for attr, text in (
            ("head_weights", self.head_loss_weights),
            ("ensemble_weights", self.ensemble_weights),
            ("self_distill_weights", self.self_distill_weights),
            ("head_temperatures", self.head_temperatures),
        ):
            given = parse_weights(text, attr)
            if given:
                setattr(config, attr, {**getattr(config, attr), **given})
        config.validate()
        return config

    def recipe(self, sparse_init: str = "auto") -> Recipe:
        """The :class:`~flagm3.recipe.Recipe` these arguments train with (``sparse_init``: the model argument)."""
        return Recipe.from_args(self, sparse_init=sparse_init)

    def training_attention_dropout(self) -> Optional[float]:
        """``attention_dropout`` when given, else the recipe's (``None``: keep the encoder's own)."""
        return self.recipe().attention_dropout

    def differences_from_flagembedding(self, settings: Optional[Iterable[str]] = None) -> list[str]:
        """Where the objective these arguments train differs from the one FlagEmbedding 1.4.2 trains with the
        same flags: the effective loss config against the ``bge-m3`` preset built from the same arguments. One
        line per differing setting (only ``settings``, M3LossConfig field names, when given), naming the flag
        that restores FlagEmbedding's value (a value ``flagm3 train`` parses); empty when they agree."""
        ours, theirs = self.loss_config(), self.loss_config(preset="bge-m3")
        mine, reference = asdict(ours), asdict(theirs)
        trained = set(ours.heads) | ({"ensemble"} if len(ours.heads) > 1 else set())
        lines = []
        for name, value in mine.items():
            if value == reference.get(name) or (settings is not None and name not in settings):
                continue
            flag = _LOSS_FLAGS.get(name, name)
            if isinstance(value, dict):
                for key in sorted(set(value) | set(reference[name])):
                    untrained = key in (*HEADS, "ensemble") and key not in trained  # its weight changes nothing
                    ours_key, theirs_key = _effective(ours, name, key), _effective(theirs, name, key)
                    if ours_key != theirs_key and not untrained:
                        lines.append(f"{name}[{key}] = {ours_key:g} (FlagEmbedding: {theirs_key:g}; "
                                     f"--{flag} {key}={theirs_key:g})")
            else:
                shown = ",".join(reference[name]) if isinstance(reference[name], (list, tuple)) else reference[name]
                lines.append(f"{name} = {value} (FlagEmbedding: {reference[name]}; --{flag} {shown})")
        return lines


# --use_mrl without --mrl_dims: FlagEmbedding's embedder default is the full size only; here 1/4 and 1/2 of
# BGE-M3's 1024 dimensions (each capped at the head's size).
MRL_DEFAULT_DIMS = (256, 512)


def _effective(config: M3LossConfig, name: str, key: str) -> float:
    """The value an ``M3LossConfig`` dict setting has for ``key``, defaults included (a temperature not
    overridden per head is ``temperature``)."""
    if name == "head_temperatures":
        return config.head_temperature(key)
    if name == "head_weights":
        return config.head_weight(key)
    default = 1.0 if name == "self_distill_weights" else 0.0  # as M3LossConfig.distilled_heads/ensemble_members
    return float(getattr(config, name).get(key, default))


# M3LossConfig field -> the argument that sets it (fields not listed are set by the argument of the same name)
_LOSS_FLAGS = {"head_weights": "head_loss_weights"}


# FlagEmbedding's flags that ask for a part of its objective the flagm3 recipe changes: flag -> the M3LossConfig
# settings it asks for (None: all of them; --unified_finetuning asks for BGE-M3's joint training of every head).
FLAGEMBEDDING_RECIPE_FLAGS: Dict[str, Optional[tuple[str, ...]]] = {
    "unified_finetuning": None,
    "use_self_distill": ("self_distill_weights",),
    "temperature": ("head_temperatures",),
}


def recipe_warning(args: M3TrainingArguments, given: Iterable[str] = ()) -> Optional[str]:
    """The one warning ``flagm3 train`` logs when FlagEmbedding flags given explicitly (``given``: argument
    names, see :data:`FLAGEMBEDDING_RECIPE_FLAGS`) ask for what ``--loss_preset flagm3`` changes; ``None`` when
    none does, or when ``--loss_preset`` was given explicitly (the recipe is then a choice)."""
    given = set(given)
    asked = [FLAGEMBEDDING_RECIPE_FLAGS[name] for name in given if name in FLAGEMBEDDING_RECIPE_FLAGS]
    if not asked or "loss_preset" in given:
        return None
    settings = None if None in asked else {s for names in asked for s in names}
    lines = args.differences_from_flagembedding(settings)
    if not lines:
        return None
    flags = ", ".join(f"--{name}" for name in sorted(given & set(FLAGEMBEDDING_RECIPE_FLAGS)))
    return (f"--loss_preset {args.loss_preset} trains another objective than the FlagEmbedding flags given ({flags}) "
            "ask for: "
            + "; ".join(lines) + ". --loss_preset bge-m3 restores all of it.")
