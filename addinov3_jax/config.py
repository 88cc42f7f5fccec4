"""Config defaults (the paper's hyper-parameters, shared/DESIGN.md §2), validation, the demo.

The files in `configs/` start from `base_config()`; `addinov3 demo` uses `demo_config()` so that
it also runs from an installed package without the repository's `configs/` folder. A config is
data: `validate(config)` checks every enumerated field, every size and the sharding rules once,
at load, and names the field and the allowed values when something is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import ml_collections

from addinov3_jax.data import readers, records
from addinov3_jax.models import clip_text, fewshot, layers, sharding
from addinov3_jax.models import model as ad


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field and what is allowed."""


def dataset_entry(root: str, classes: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """One evaluation dataset: its root folder and (optionally) the classes to evaluate."""
    return ml_collections.ConfigDict({"root": root, "classes": tuple(classes)})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A variant name builds a random-init tower (tests, demo); a path loads converted weights.
    c.model.backbone = "vitl16"
    c.model.text_tower = "vitl14_336"
    c.model.text_activation = "gelu"  # what AD-DINOv3 runs the OpenAI weights with
    c.model.feature_layers = (5, 11, 17, 23)
    c.model.text_layout = "stack"  # "interleave" = official quirk
    # "readable" (dataset names), "path" (official quirk: "Data" for VisA) or "fixed" (one word
    # for every class: `class_name`).
    c.model.class_name_source = "readable"
    c.model.class_name = ""
    c.model.image_score = "global"
    c.model.smoothing_sigma = 0.0
    c.model.compute_dtype = "float32"  # "bfloat16": bf16 matmuls, fp32 norms / softmax / loss
    c.model.param_dtype = "float32"  # storage of the frozen towers' parameters
    c.model.attention_impl = "auto"  # one of layers.ATTENTION_IMPLEMENTATIONS; "auto": cuDNN on
    # GPU for bf16, "blockwise" on CPU for large logits, "xla" otherwise
    c.model.scan_layers = True

    c.data = ml_collections.ConfigDict()
    c.data.name = "visa"
    c.data.root = "data/visa"
    c.data.split = "test"  # zero-shot: train on the auxiliary dataset's test split
    c.data.classes = ()  # empty: all classes
    c.data.on_bad_sample = "error"
    c.data.source = "raw"  # or "tfds" (ArrayRecord built by `addinov3 data build`)
    c.data.tfds_data_dir = ""
    c.data.image_size = 512
    c.data.worker_count = -1  # grain worker processes; -1: from the host's cores, 0: in-process

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.epochs = 100
    c.train.lr = 1e-5
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.weight_decay = 1e-2
    c.train.warmup_fraction = 0.03
    # "device", "memory" (host RAM), "disk", "off"; "auto": device when it fits in
    # feature_cache_max_gb, else disk (any number of processes; each holds the whole cache).
    c.train.feature_cache = "auto"
    c.train.feature_cache_dtype = "float32"  # or "bfloat16"
    c.train.feature_cache_max_gb = 8.0
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.stop_after = 0  # > 0: stop (checkpointed, resumable) after this step

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # (logical axis, mesh axes) pairs; presets: sharding.rules_preset("default" | "replicated").
    c.mesh.rules = sharding.DEFAULT_RULES
    c.multihost = False

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ml_collections.ConfigDict()  # NAME -> dataset_entry(root, classes)
    c.eval.batch_size = 8
    c.eval.resolution = "network"  # or "original"
    c.eval.heatmaps_per_category = 4
    c.eval.curves = True
    # Few-shot (shared/reference/fewshot.md): shots > 0 adds a memory bank of `shots` train/good
    # images per class, one per seed of `shot_seeds`; results are the mean over seeds.
    c.eval.shots = 0  # 0 = zero-shot only
    # Decisions (calibration.py): > 0 calibrates each class on its train/good images at this
    # false-alarm rate and reports the measured false-alarm and detection rates; 0 = off.
    c.eval.calibration = ml_collections.ConfigDict({"false_alarm_rate": 0.0})
    c.eval.shot_seeds = (0,)
    # The fields of fewshot.FewShotConfig with its defaults (documented there), but shots / seeds.
    c.eval.fewshot = ml_collections.ConfigDict({
        f.name: f.default for f in dataclasses.fields(fewshot.FewShotConfig)
        if f.name not in ("shots", "seeds")})
    return c


def shrink(c: ml_collections.ConfigDict) -> None:
    """`tiny`: random tiny towers, small images, two epochs (a laptop run of the same code)."""
    c.model.backbone = "tiny"
    c.model.text_tower = "tiny"
    c.model.feature_layers = (0, 1, 2, 3)
    c.data.image_size = 64
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 10


def check_arg(arg: str, allowed: Iterable[str], config_file: str) -> None:
    """Refuses an unknown `configs/NAME.py:ARG`."""
    allowed = tuple(allowed)
    if arg not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{config_file}: unknown argument {arg!r}; allowed: {shown}")


AUXILIARY = ("marble", "stripes", "grain", "mesh", "washer", "button")
HELD_OUT = ("weave", "carpet", "pill", "hexnut")


def demo_config(arg: str = "") -> ml_collections.ConfigDict:
    """The synthetic tiny run of `addinov3 demo` (`arg="quick"`: the same run at 64 px and 2
    epochs, for tests)."""
    check_arg(arg, ("", "quick"), "configs/demo.py")
    c = base_config()
    c.model.backbone = "tiny"
    c.model.text_tower = "tiny"
    c.model.feature_layers = (0, 1, 2, 3)
    # A random text tower gives class names no meaning: one word for every class (like the
    # official VisA training, where every class is "Data").
    c.model.class_name_source = "fixed"
    c.model.class_name = "object"
    c.data.name = "synthetic"
    c.data.root = "demo_data/synthetic"
    c.data.classes = AUXILIARY
    c.data.image_size = 128
    c.train.batch_size = 8
    c.train.epochs = 20
    c.train.lr = 3e-3  # tiny random towers: a much larger step than the paper's 1e-5
    c.train.warmup_fraction = 0.03
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.eval.datasets = ml_collections.ConfigDict(
        {"synthetic": dataset_entry("demo_data/synthetic", HELD_OUT)})
    c.eval.batch_size = 16
    # Few-shot settings (`addinov3 eval --config.eval.shots=K`, the demo's 1 / 4 shots), chosen
    # on a validation split of the AUXILIARY categories only (benchmarks/fewshot_settings.py,
    # numbers in benchmarks/RESULTS.md): "dihedral" views beat none / flip / rot90; the fusion
    # weight made no difference there (the tiny model's zero-shot maps vary ~1e-6), so "add", 1.
    c.eval.fewshot.augment = "dihedral"
    c.eval.fewshot.fusion = "add"
    c.eval.fewshot.fusion_weight = 1.0
    if arg == "quick":  # for tests
        c.data.image_size = 64
        c.train.epochs = 2
    return c


# ---------------------------------------------------------------------------------------------
# Validation

# Choices owned by the runtime, declared here once (the runtime and the CLI read them from here).
FEATURE_CACHE_MODES = ("auto", "device", "memory", "disk", "off")
RESOLUTIONS = ("network", "original")

# Every enumerated field and its allowed values, read from the module that owns each choice.
ENUMS = {
    "model.text_layout": ad.TEXT_LAYOUTS,
    "model.class_name_source": records.CLASS_NAME_SOURCES,
    "model.image_score": ad.IMAGE_SCORES,
    "model.compute_dtype": layers.DTYPES,
    "model.text_activation": (*clip_text.ACTIVATIONS, ""),
    "model.param_dtype": layers.DTYPES,
    "model.attention_impl": tuple(a for a in layers.ATTENTION_IMPLEMENTATIONS if a),
    "data.source": readers.SOURCES,
    "data.on_bad_sample": readers.ON_BAD_SAMPLE,
    "train.feature_cache": FEATURE_CACHE_MODES,
    "train.feature_cache_dtype": layers.DTYPES,
    "eval.resolution": RESOLUTIONS,
    "eval.fewshot.augment": tuple(fewshot.AUGMENTS),
    "eval.fewshot.image_score": fewshot.IMAGE_SCORES,
    "eval.fewshot.fusion": fewshot.FUSIONS,
    "eval.fewshot.bank_dtype": fewshot.BANK_DTYPES,
}
POSITIVE = ("data.image_size", "train.batch_size", "train.epochs", "train.log_every",
            "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size",
            "eval.fewshot.block_size")
NON_NEGATIVE = ("train.lr", "train.weight_decay", "train.warmup_fraction", "train.stop_after",
                "model.smoothing_sigma", "eval.heatmaps_per_category", "train.feature_cache_max_gb",
                "eval.shots", "eval.fewshot.coreset_projection_dim",
                "eval.fewshot.smoothing_sigma", "eval.fewshot.fusion_weight")


def _get(c, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks `c` once (enums, sizes, rules, dataset entries); returns it. Raises ConfigError."""
    for field, allowed in ENUMS.items():
        value = _get(c, field)
        if value not in allowed:
            raise ConfigError(f"config field {field}={value!r} is not one of: "
                              + ", ".join(allowed))
    for field in POSITIVE:
        if not _get(c, field) > 0:
            raise ConfigError(f"config field {field}={_get(c, field)!r} must be > 0")
    for field in NON_NEGATIVE:
        if not _get(c, field) >= 0:
            raise ConfigError(f"config field {field}={_get(c, field)!r} must be >= 0")
    if not c.train.warmup_fraction <= 1:
        raise ConfigError(f"config field train.warmup_fraction={c.train.warmup_fraction!r} must "
                          "be between 0 and 1")
    if not c.data.worker_count >= -1:
        raise ConfigError(f"config field data.worker_count={c.data.worker_count!r} must be >= 0 "
                          "(or -1: from the host's cores)")
    if c.model.class_name_source == "fixed" and not c.model.class_name:
        raise ConfigError("config field model.class_name must name the word when "
                          "model.class_name_source='fixed'")
    if c.data.image_size % 16:
        raise ConfigError(f"config field data.image_size={c.data.image_size} must be a multiple "
                          "of the patch size 16")
    for axis in sharding.MESH_AXES:
        size = c.mesh[axis]
        if not (size >= 1 or size == -1):
            raise ConfigError(f"config field mesh.{axis}={size!r} must be >= 1 (or -1: the rest)")
    try:
        c.mesh.rules = sharding.validate_rules(c.mesh.rules)
    except ValueError as e:
        raise ConfigError(f"config field {e}") from None
    if not isinstance(c.eval.datasets, ml_collections.ConfigDict):
        raise ConfigError("config field eval.datasets must map dataset names to "
                          "config.dataset_entry(root, classes) entries")
    for name, entry in c.eval.datasets.items():
        if not isinstance(entry, ml_collections.ConfigDict) or set(entry) != {"root", "classes"}:
            raise ConfigError(f"config field eval.datasets.{name} must be "
                              "config.dataset_entry(root, classes)")
        if not entry.root:
            raise ConfigError(f"config field eval.datasets.{name}.root is empty")
    a = c.eval.calibration.false_alarm_rate
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < 1:
        raise ConfigError(f"config field eval.calibration.false_alarm_rate={a!r} must be a number in "
                          "[0, 1) (0 = no calibration; e.g. 0.05)")
    fewshot_config(c)
    return c


def fewshot_config(c: ml_collections.ConfigDict):
    """The `fewshot.FewShotConfig` of `c.eval` (shots, shot_seeds, fewshot.*). Raises ConfigError
    naming the field."""
    if not isinstance(c.eval.shots, int) or isinstance(c.eval.shots, bool):
        raise ConfigError(f"config field eval.shots={c.eval.shots!r} must be an integer >= 0")
    seeds = c.eval.shot_seeds
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"config field eval.shot_seeds={c.eval.shot_seeds!r} must be a non-empty "
                          "tuple of integers, e.g. (0, 1, 2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config field eval.shot_seeds={seeds!r} repeats a seed")
    fields = {f.name for f in dataclasses.fields(fewshot.FewShotConfig)} - {"shots", "seeds"}
    unknown = sorted(set(c.eval.fewshot) - fields)
    if unknown:
        raise ConfigError(f"config field eval.fewshot has unknown key(s) {unknown}; known: "
                          + ", ".join(sorted(fields)))
    try:
        return fewshot.FewShotConfig(shots=c.eval.shots, seeds=seeds, **c.eval.fewshot.to_dict())
    except ValueError as e:  # FewShotConfig's messages begin with the field's name
        raise ConfigError(f"config field eval.fewshot.{e}") from None
    except TypeError as e:
        raise ConfigError(f"config field eval.fewshot: {e}") from None
