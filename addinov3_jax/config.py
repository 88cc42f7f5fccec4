"""Config defaults (the paper's hyper-parameters, shared/DESIGN.md §2) and the embedded demo.

The files in `configs/` start from `base_config()`; `addinov3 demo` uses `demo_config()` so that
it also runs from an installed package without the repository's `configs/` folder.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir_checkpoints = "checkpoints"

    c.model = ml_collections.ConfigDict()
    # A variant name builds a random-init tower (tests, demo); a path loads converted weights.
    c.model.backbone = "vitl16"
    c.model.text_tower = "vitl14_336"
    c.model.text_activation = "gelu"  # what AD-DINOv3 runs the OpenAI weights with
    c.model.feature_layers = (5, 11, 17, 23)
    c.model.text_layout = "stack"  # "interleave" = official quirk
    c.model.class_name_source = "readable"  # "path" = official quirk ("Data" for VisA); "fixed:WORD"
    c.model.image_score = "global"
    c.model.smoothing_sigma = 0.0
    c.model.compute_dtype = "float32"  # "bfloat16": bf16 matmuls, fp32 norms / softmax / loss
    c.model.param_dtype = "float32"  # storage of the frozen towers' parameters
    c.model.attention_impl = "auto"  # "auto" (cuDNN on GPU for bf16), "xla", "cudnn", "splash"
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
    c.train.feature_cache = "auto"  # "device", "memory" (host RAM), "disk", "off"; "auto": device
    # when it fits in feature_cache_max_gb, else disk (single-host; multi-host runs use "off")
    c.train.feature_cache_dtype = "float32"  # or "bfloat16"
    c.train.feature_cache_max_gb = 8.0  # "auto": device memory up to this size, else disk
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "replicated"  # or "fsdp" for the large backbones
    c.multihost = False

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ()  # tuple of "name=root" strings
    c.eval.classes = ()  # empty: all classes of each dataset
    c.eval.batch_size = 8
    c.eval.resolution = "network"  # or "original"
    c.eval.heatmaps_per_category = 4
    c.eval.curves = True
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


AUXILIARY = ("marble", "stripes", "grain", "mesh", "washer", "button")
HELD_OUT = ("weave", "carpet", "pill", "hexnut")


def demo_config(arg: str = "") -> ml_collections.ConfigDict:
    """The synthetic tiny run of `addinov3 demo` (`arg="quick"`: 2 epochs, for tests)."""
    c = base_config()
    c.model.backbone = "tiny"
    c.model.text_tower = "tiny"
    c.model.feature_layers = (0, 1, 2, 3)
    # A random text tower gives class names no meaning: one word for every class (like the
    # official VisA training, where every class is "Data").
    c.model.class_name_source = "fixed:object"
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
    c.eval.datasets = ("synthetic=demo_data/synthetic",)
    c.eval.classes = HELD_OUT
    c.eval.batch_size = 16
    if arg == "quick":  # for tests
        c.train.epochs = 2
    return c
