"""Config of HeLlO (image-to-label projectors instead of stored soft labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_positive
from modelatlas.distill.nets import MAX_WIDTH
from modelatlas.errors import ConfigError

HEAD_INITS = ("text", "class_mean")


@dataclass
class HelloConfig(MethodConfig):
    """HeLlO fields.

    ``teacher_steps``: SGD steps (lr ``lr_teacher``, batch ``batch_real``) of the teacher on real data; its
    feature extractor is the frozen backbone of the projector. The teacher is cached in ``cache_dir`` (default
    ``$ATLAS_CACHE_DIR/hello`` or ``~/.cache/modelatlas/hello``) and reused by runs with the same data,
    network, teacher settings and seed. ``head_init``: "text" (MiniLM embeddings of one
    prompt per class, "the digit zero" for digit names) or "class_mean" (mean projected feature of each class's
    synthetic images; its (K, 384) matrix is then stored). ``rank``: LoRA rank of the head update B A.
    ``projector_steps`` Adam steps (``lr_projector``) fit the projector to the teacher's soft labels
    (temperature ``temperature``) on augmented synthetic and real images; then ``iterations`` Adam steps
    (``lr_img``) nudge the images to shrink the teacher-projector KL (keep it small: at 0.01 the nudged
    digits lost ~10 points even with hard labels).
    """

    iterations: int = 100
    min_iterations: ClassVar[int] = 0
    teacher_steps: int = 500
    lr_teacher: float = 0.01
    batch_real: int = 256
    head_init: str = "text"
    rank: int = 4
    text_dim: int = 384
    projector_steps: int = 300
    lr_projector: float = 0.01
    lr_img: float = 0.001
    temperature: float = 1.0
    init: str = "real"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "teacher_steps", "lr_teacher", "batch_real", "rank", "text_dim", "lr_projector",
                       "lr_img", "temperature")
        if self.text_dim > MAX_WIDTH:  # (feature dim, text_dim) projection: an allocator error after the teacher
            raise ConfigError(f"text_dim must be at most {MAX_WIDTH:,}, got {self.text_dim:,}")
        if self.rank > self.text_dim:  # B A is (K, text_dim): its rank cannot exceed text_dim
            raise ConfigError(f"rank ({self.rank}) must be <= text_dim ({self.text_dim}); lower rank")
        if self.projector_steps < 0:
            raise ConfigError(f"projector_steps must be >= 0, got {self.projector_steps}")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        check_choice(self, "init")
