"""Every script's config defaults and the rules they are checked against: the one place that says which keys
exist. Torch-free, so ``--help`` and ``--print-config`` answer at once.

Each experiment YAML in ``configs/`` overrides some of these values; ``python SCRIPT --print-config`` prints the
resolved result.
"""
from __future__ import annotations

from helpers.config import Rule, Schema

#: the same pattern as helpers.distributed.check_device_name (which needs torch; this module must not)
DEVICE = Rule(types=(str,), pattern=r"auto|cpu|cuda(:\d+)?", pattern_text="auto, cpu, cuda or cuda:N")
POSITIVE_INT = Rule(min=1)
NON_NEGATIVE_INT = Rule(min=0)
OPTIONAL_POSITIVE_INT = Rule(types=(int,), nullable=True, min=1)
PROBABILITY = Rule(min=0.0, max=1.0)
DEPTH = Rule(choices=(50, 101))

EVAL_METHODS = ("cvnet_global", "cvnet_rerank", "superglobal", "superglobal_rerank", "timm_global")
#: The methods run by default (timm_global needs model.timm.arch)
DEFAULT_EVAL_METHODS = EVAL_METHODS[:4]
RERANK_MODES = ("clean", "paper")
#: The post-processing steps of a global ranking, in the order they are applied (and spelt in ``post.rows``):
#: learned whitening changes the descriptors, then alpha-DBA, alpha-QE, k-reciprocal (helpers.postprocess).
#: Flip test-time augmentation, an extraction option, will come first once the engine has it ("flip").
POST_STEPS = ("flip", "whitening", "dba", "aqe", "kreciprocal")
#: Every ``post.rows`` entry: a non-empty '+'-joined combination of POST_STEPS, in their order.
POST_ROWS = tuple("+".join(s for k, s in enumerate(POST_STEPS) if mask >> k & 1)
                  for mask in sorted(range(1, 1 << len(POST_STEPS)), key=lambda m: (bin(m).count("1"), m)))
SHA256 = Rule(types=(str,), nullable=True, pattern=r"[0-9a-fA-F]{64}", pattern_text="64 hexadecimal digits")

EVAL = Schema(
    name="eval.py",
    defaults={
        "name": None,
        "output_dir": "runs/eval",
        "seed": 0,
        "device": "auto",
        "tf32": False,  # TF32 float32 matmuls and convolutions on a GPU (helpers.distributed.set_tf32)
        "threads": None,
        "methods": list(DEFAULT_EVAL_METHODS),
        "data": {
            "root": "data",
            "datasets": ["roxford5k", "rparis6k"],
            "distractors": None,
            "distractors_dtype": "float32",
            "min_side": None,
            "synthetic": {"name": None, "config": {}},
        },
        "model": {
            "depth": 50,
            "weights": None,
            "weights_sha256": None,
            "builtin_checkpoints": {"rerank": None, "backbone": None},
            "cvnet_scales": [0.7071, 1.0, 1.4142],
            "superglobal": {"gemp": True, "rgem": True, "sgem": True, "relup": True,
                            "scales": [0.7071, 1.0, 1.4142], "antialias": True},
            "timm": {"arch": None, "weights": None, "pooling": "gem", "dim": None},
        },
        "rerank": {
            "cvnet": {"mode": "clean", "top_k": 100, "weight": 0.5, "batch_size": 32, "chunk_images": 256,
                      "cache_maps": False},
            "superglobal": {"M": 400, "K": 9, "beta": 0.15, "database": "tensor"},
        },
        "extraction": {"batch_size": 8, "num_workers": 0, "cache_dir": "cache/features", "shard_size": 20000,
                       "flip": False},
        # extra rows per global ranking (cvnet_global, superglobal): post-processed copies; the main rows stay
        "post": {
            "rows": [],
            "aqe": {"k": 2, "alpha": 3.0},
            "dba": {"k": 2, "alpha": 3.0},
            "kreciprocal": {"k1": 20, "k2": 6, "lambda": 0.3},
            "shortlist": 1000,
            "full_limit": 20000,
            "whitening": {"source": None, "dim": None, "images": None},
        },
        "export": {"ames": None, "shortlist": 1600, "reranked": False},
        "eval": {"kappas": [1, 5, 10]},
        "viz": {"num_queries": 3, "top": 10, "height": 160},
        "paper_results": "configs/paper_results.yaml",
        "progress": True,
    },
    rules={
        "name": Rule(types=(str,), nullable=True),
        "seed": NON_NEGATIVE_INT,
        "device": DEVICE,
        "threads": OPTIONAL_POSITIVE_INT,
        "methods": Rule(choices=EVAL_METHODS),
        "data.datasets": Rule(items=str),
        "data.distractors": Rule(choices=("revisitop1m",), nullable=True),
        "data.distractors_dtype": Rule(choices=("float32", "float16")),
        "data.min_side": OPTIONAL_POSITIVE_INT,
        "data.synthetic.name": Rule(types=(str,), nullable=True),
        "model.timm.arch": Rule(types=(str,), nullable=True, pattern=r"timm:.+", pattern_text="timm:<model name>"),
        "model.timm.weights": Rule(types=(str,), nullable=True),
        "model.timm.pooling": Rule(choices=("gem", "gem+", "rgem", "token")),
        "model.timm.dim": OPTIONAL_POSITIVE_INT,
        "model.depth": DEPTH,
        "model.weights": Rule(types=(str,), nullable=True),
        "model.weights_sha256": SHA256,
        "model.builtin_checkpoints.rerank": Rule(types=(str,), nullable=True),
        "model.builtin_checkpoints.backbone": Rule(types=(str,), nullable=True),
        "model.cvnet_scales": Rule(items=float, min=0.05, max=4.0),
        "model.superglobal.scales": Rule(items=float, min=0.05, max=4.0),
        "rerank.cvnet.mode": Rule(choices=RERANK_MODES),
        "rerank.cvnet.top_k": POSITIVE_INT,
        "rerank.cvnet.batch_size": POSITIVE_INT,
        "rerank.cvnet.chunk_images": POSITIVE_INT,
        "rerank.superglobal.M": POSITIVE_INT,
        "rerank.superglobal.K": POSITIVE_INT,
        "rerank.superglobal.beta": Rule(min=0.0),
        "rerank.superglobal.database": Rule(choices=("tensor", "tensor_db", "faiss")),
        "extraction.batch_size": POSITIVE_INT,
        "extraction.num_workers": NON_NEGATIVE_INT,
        "extraction.cache_dir": Rule(types=(str,), nullable=True),
        "extraction.shard_size": OPTIONAL_POSITIVE_INT,
        "post.rows": Rule(choices=POST_ROWS),
        "post.aqe.k": POSITIVE_INT,
        "post.aqe.alpha": Rule(min=0.0),
        "post.dba.k": POSITIVE_INT,
        "post.dba.alpha": Rule(min=0.0),
        "post.kreciprocal.k1": POSITIVE_INT,
        "post.kreciprocal.k2": POSITIVE_INT,
        "post.kreciprocal.lambda": PROBABILITY,
        "post.shortlist": POSITIVE_INT,
        "post.full_limit": NON_NEGATIVE_INT,
        "post.whitening.source": Rule(types=(str,), nullable=True),
        "post.whitening.dim": OPTIONAL_POSITIVE_INT,
        "post.whitening.images": Rule(types=(int,), nullable=True, min=2),
        "export.ames": Rule(types=(str,), nullable=True),
        "export.shortlist": POSITIVE_INT,
        "eval.kappas": Rule(items=int, min=1),
        "viz.num_queries": NON_NEGATIVE_INT,
        "viz.top": POSITIVE_INT,
        "viz.height": Rule(min=16),
        "paper_results": Rule(types=(str,), nullable=True),
    },
    open_sections=("data.synthetic.config",),
)

_TRAIN_COMMON_DEFAULTS = {
    "optim": {"name": "sgd", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False,
              "betas": [0.9, 0.999]},
    # warmup_ratio: the warm-up as a fraction of the run's steps (instead of warmup_steps)
    "schedule": {"name": "cosine", "warmup_steps": 0, "warmup_ratio": None, "final_ratio": 0.0},
}

_TRAIN_COMMON_RULES = {
    "run.seed": NON_NEGATIVE_INT,
    "data.name": Rule(choices=("synthetic", "gldv2", "folder", "cifar10")),
    "data.synthetic.name": Rule(types=(str,)),
    "data.gldv2.split": Rule(types=(str,)),
    "data.gldv2.exclude_landmarks_file": Rule(types=(str,), nullable=True),
    "data.gldv2.min_class_size": POSITIVE_INT,
    "data.image_size": Rule(min=16),
    "data.max_corrupt": Rule(types=(int,), nullable=True, min=0),
    "data.augment.scale": Rule(items=float, length=2, min=0.0, max=1.0),
    "data.augment.ratio": Rule(items=float, length=2, min=0.0),
    "data.augment.flip": PROBABILITY,
    "optim.name": Rule(choices=("sgd", "adam", "adamw")),
    "optim.lr": Rule(min=0.0),
    "optim.weight_decay": Rule(min=0.0),
    "optim.betas": Rule(items=float, length=2, min=0.0, max=1.0),
    "schedule.name": Rule(choices=("cosine", "linear", "constant")),
    "schedule.warmup_steps": NON_NEGATIVE_INT,
    "schedule.warmup_ratio": Rule(types=(float,), nullable=True, min=0.0, max=1.0),
    "train.epochs": OPTIONAL_POSITIVE_INT,
    "train.steps": OPTIONAL_POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.grad_clip": Rule(types=(float, int), nullable=True, min=0.0),
    "train.amp": Rule(choices=("auto", True, False)),
    "train.device": DEVICE,
    "train.num_workers": NON_NEGATIVE_INT,
    "train.checkpoint_every": POSITIVE_INT,
    "train.log_every": POSITIVE_INT,
    "train.threads": OPTIONAL_POSITIVE_INT,
}


def _train_data(min_class_size: int, augment: dict) -> dict:
    return {"name": "synthetic", "root": "data", "synthetic": {"name": "synth", "config": {}},
            "gldv2": {"split": "train_clean", "exclude_revisited": False, "exclude_landmarks_file": None,
                      "min_class_size": min_class_size},
            "image_size": 512, "max_corrupt": 100, "augment": augment}


def _train_section(batch_size: int) -> dict:
    return {"epochs": 25, "steps": None, "batch_size": batch_size, "grad_clip": 15.0, "amp": "auto",
            "device": "auto", "tf32": False, "num_workers": 8, "checkpoint_every": 1000, "log_every": 20,
            "threads": None, "deterministic": False, "fixed_batch": False}


TRAIN_BACKBONE = Schema(
    name="train_backbone.py",
    defaults={
        "run": {"out_dir": "runs/builtin/backbone", "seed": 0},
        # arch: "resnet" = CVNet-Global (depth, GeM, fc to reduction_dim); "timm:<name>" = models.TimmGlobal
        # (pooling, reduction_dim = its projection or null for none, pretrained_file = local timm weights,
        # head = linear (L2, fc, L2) or embedding (fc, BatchNorm, Dropout head_dropout, L2))
        "model": {"arch": "resnet", "depth": 50, "reduction_dim": 2048, "pooling": "gem", "imagenet_weights": "auto",
                  "pretrained_file": None, "init_checkpoint": None, "zero_init_residual": False, "head": "linear",
                  "head_dropout": 0.1},
        # sampler: random = the shuffled order; pk = P classes x K images per batch (P = train.batch_size / k)
        "data": {**_train_data(1, {"scale": [0.35, 1.0], "ratio": [0.75, 1.3333], "flip": 0.5, "brightness": 0.2,
                                   "contrast": 0.2, "saturation": 0.2}),
                 "label_cache": None, "sampler": {"name": "random", "k": 4}},
        # name: cvnet = CurricularFace (margin, scale, t_momentum) + momentum contrast (temperature, queue_size,
        # form, key_momentum), weighted by lambda_cls / lambda_con; circle = Circle loss (circle.m, circle.gamma),
        # pairs chosen by miner.name (null: all) from epoch miner.start_epoch on
        "loss": {"name": "cvnet", "margin": 0.15, "scale": 30.0, "t_momentum": 0.01, "temperature": 1 / 30,
                 "queue_size": 8192, "form": "supcon", "lambda_cls": 0.5, "lambda_con": 0.5, "key_momentum": 0.999,
                 "circle": {"m": 0.4, "gamma": 80.0},
                 "miner": {"name": None, "epsilon": 0.1, "start_epoch": 0}},
        # layer_decay: layer-wise learning-rate decay (null: one learning rate)
        "optim": {**_TRAIN_COMMON_DEFAULTS["optim"], "layer_decay": None},
        "schedule": dict(_TRAIN_COMMON_DEFAULTS["schedule"]),
        "train": _train_section(128),
    },
    rules={
        **_TRAIN_COMMON_RULES,
        "model.arch": Rule(types=(str,), pattern=r"resnet|timm:[A-Za-z0-9_.\-]+",
                           pattern_text="resnet, or timm:<timm model name> such as timm:vit_small_patch16_224"),
        "model.depth": DEPTH,
        "model.reduction_dim": OPTIONAL_POSITIVE_INT,
        "model.pooling": Rule(choices=("gem", "gem+", "rgem", "token")),
        "model.pretrained_file": Rule(types=(str,), nullable=True),
        "model.imagenet_weights": Rule(choices=("auto", True, False)),
        "model.init_checkpoint": Rule(types=(str,), nullable=True),
        "model.head": Rule(choices=("linear", "embedding")),
        "model.head_dropout": Rule(min=0.0, max=1.0),
        "data.label_cache": Rule(types=(str,), nullable=True),
        "data.sampler.name": Rule(choices=("random", "pk")),
        "data.sampler.k": POSITIVE_INT,
        "loss.name": Rule(choices=("cvnet", "circle")),
        "loss.circle.m": Rule(min=0.0),
        "loss.circle.gamma": Rule(min=0.0),
        "loss.miner.name": Rule(choices=("multi_similarity",), nullable=True),
        "loss.miner.epsilon": Rule(min=0.0),
        "loss.miner.start_epoch": NON_NEGATIVE_INT,
        "optim.layer_decay": Rule(types=(float,), nullable=True, min=0.0, max=1.0),
        "loss.scale": Rule(min=0.0),
        "loss.temperature": Rule(min=1e-6),
        "loss.queue_size": NON_NEGATIVE_INT,
        "loss.form": Rule(choices=("supcon", "per_positive")),
        "loss.key_momentum": PROBABILITY,
        "loss.t_momentum": PROBABILITY,
    },
    open_sections=("data.synthetic.config",),
)

TRAIN_RERANK = Schema(
    name="train_rerank.py",
    defaults={
        "run": {"out_dir": "runs/builtin/rerank", "seed": 0},
        "backbone": {"checkpoint": "runs/builtin/backbone/last.pyth"},
        "model": {"head_init": "random"},
        "data": _train_data(2, {"scale": [0.5, 1.0], "ratio": [0.75, 1.3333], "flip": 0.0, "brightness": 0.2,
                                "contrast": 0.2, "saturation": 0.2}),
        "mining": {"image_size": 512, "batch_size": 64, "num_positives": 20, "num_negatives": 100},
        "curriculum": {"pool_start": 100, "pool_end": 10, "hide_grid": 4, "hide_prob_start": 0.0,
                       "hide_prob_end": 0.3},
        # the re-ranking head's optimiser defaults are Adam's, unlike the backbone's SGD
        "optim": {"name": "adam", "lr": 0.0015, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False,
                  "betas": [0.9, 0.999]},
        "schedule": dict(_TRAIN_COMMON_DEFAULTS["schedule"]),
        "train": {**_train_section(144), "pairs": "mined"},
    },
    rules={
        **_TRAIN_COMMON_RULES,
        "backbone.checkpoint": Rule(types=(str,)),
        "model.head_init": Rule(choices=("random", "checkpoint")),
        "mining.image_size": Rule(min=16),
        "mining.batch_size": POSITIVE_INT,
        "mining.num_positives": POSITIVE_INT,
        "mining.num_negatives": POSITIVE_INT,
        "curriculum.pool_start": POSITIVE_INT,
        "curriculum.pool_end": POSITIVE_INT,
        "curriculum.hide_grid": POSITIVE_INT,
        "curriculum.hide_prob_start": PROBABILITY,
        "curriculum.hide_prob_end": PROBABILITY,
        "train.pairs": Rule(choices=("mined", "all")),
    },
    open_sections=("data.synthetic.config",),
)
