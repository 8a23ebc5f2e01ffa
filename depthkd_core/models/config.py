"""ModelConfig: everything needed to rebuild a DepthNet (stored in checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

BIN_LAYOUTS = ("log", "linear")
FASTDEPTH_DECODER_STAGES = 5  # NNConv5's; fastdepth.DECODER_CHANNELS has one width each


@dataclass
class ModelConfig:
    """Architecture of a DepthNet.

    name: registry key in ``MODELS`` ("student" light decoder, "teacher" U-Net,
        "fastdepth" MobileNet-NNConv5 with its own encoder: ``encoder`` and ``head``
        do not apply to it).
    encoder: timm model name (always built with ``pretrained=False``).
    head: registry key in ``HEADS`` ("direct", "bins", "dpm").
    min_depth, max_depth: metric output range in metres (all heads are bounded).
    num_bins: K for the "bins" (AdaBins) and "dpm" (TIE-KD) heads.
    bin_layout: DPM bin centre spacing, "log" (TIE-KD default) or "linear".
    decoder_channels: output channels of each decoder stage (strides 16, 8, 4, 2;
        fastdepth: 16, 8, 4, 2, 1); None uses the registry entry's default.
    encoder_channels: fastdepth only: the widths of its stem and 13 blocks (None =
        MobileNet v1 1.0); timm encoders take theirs from ``encoder``.
    pretrained: local timm-format weights of the encoder (.pth/.safetensors);
        fastdepth: a FastDepth ONNX file or depthkd checkpoint (e.g. a pruned
        teacher, models/prune.py) whose weights initialise the whole model.
    input_size: (H, W) the encoder is built for; needed by ViT encoders (fixed
        position embeddings) and used as Swin's reference size; None = any size.
        fastdepth runs at it whatever size it is given (any size >= 32; antialiased
        resize in, bilinear out), so it then takes images of any size.
    lgconv_stages: encoder feature stages wrapped in LG-Conv (DisDepth; negative
        from the deepest, e.g. (-4, -3, -2, -1)); () = none. CNN encoders only.
    lgconv_heads: M, the global vectors of each LG-Conv.
    scale_head: fastdepth only: hidden width of a global scale head (0 = none). It reads
        the average-pooled bottleneck and multiplies the image's depth by one factor,
        exp(MLP), starting at 1 (zero last layer), so a teacher's imported weights compute
        what they did. A per-image scale read from the whole image, for a student whose
        remaining error is the scale of each image (docs/student.md).
    decoder_stages: fastdepth only: how many of its 5 decoder stages run (1..5). With
        fewer, the output conv reads the last kept stage (after its x2 upsampling and
        skip) and its depth is upsampled bilinearly to the input size: the teacher's
        depth is smooth enough that a stride-8 grid loses nothing measurable of it, while
        the full-resolution stages cost half of a 160x160 FastDepth's time
        (docs/student.md). ``models.prune.cut_decoder`` makes one from a full network.
    """

    name: str = "student"
    encoder: str = "mobilenetv2_100"
    head: str = "direct"
    min_depth: float = 0.1
    max_depth: float = 10.0
    num_bins: int = 64
    bin_layout: str = "log"
    decoder_channels: tuple[int, ...] | None = None
    encoder_channels: tuple[int, ...] | None = None
    pretrained: str | None = None
    input_size: tuple[int, int] | None = None
    lgconv_stages: tuple[int, ...] = ()
    lgconv_heads: int = 4
    scale_head: int = 0
    decoder_stages: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.min_depth < self.max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={self.min_depth}, "
                             f"max_depth={self.max_depth}")
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        if self.bin_layout not in BIN_LAYOUTS:
            raise ValueError(f"bin_layout must be one of {BIN_LAYOUTS}, got '{self.bin_layout}'")
        for name in ("decoder_channels", "encoder_channels"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(c) for c in value)
                if not value or min(value) < 1:
                    raise ValueError(f"{name} must be positive, got {value}")
                setattr(self, name, value)
        if self.input_size is not None:
            if len(self.input_size) != 2 or min(self.input_size) < 32:
                raise ValueError(f"input_size must be (H, W) >= 32, got {self.input_size}")
            self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        self.lgconv_stages = tuple(int(s) for s in self.lgconv_stages)
        if self.lgconv_heads < 1:
            raise ValueError(f"lgconv_heads must be >= 1, got {self.lgconv_heads}")
        if self.scale_head < 0:
            raise ValueError(f"scale_head must be >= 0, got {self.scale_head}")
        if self.scale_head and self.name != "fastdepth":
            raise ValueError(f"scale_head is a fastdepth option; model '{self.name}' has none")
        if not 1 <= self.decoder_stages <= FASTDEPTH_DECODER_STAGES:
            raise ValueError(f"decoder_stages must be in 1..{FASTDEPTH_DECODER_STAGES}, "
                             f"got {self.decoder_stages}")
        if self.cuts_decoder and self.name != "fastdepth":
            raise ValueError(f"decoder_stages is a fastdepth option; model '{self.name}' has none")

    @property
    def cuts_decoder(self) -> bool:
        """Whether fewer than all of fastdepth's decoder stages run."""
        return self.decoder_stages < FASTDEPTH_DECODER_STAGES

    @property
    def resizes_input(self) -> bool:
        """Whether the network resizes any image to ``input_size`` itself (fastdepth)."""
        return self.name == "fastdepth" and self.input_size is not None
