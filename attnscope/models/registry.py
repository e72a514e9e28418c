"""Which ViT a name means: aliases, their timm names and training families."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from attnscope.errors import AttnscopeError

FAMILIES = ("MIM", "MIM (fine-tuned)", "JEA", "supervised", "language-supervised", "unknown")


@dataclass(frozen=True)
class ModelSpec:
    """One registered alias: the timm name it stands for and what kind of training made it."""

    alias: str
    timm_name: str
    family: str
    notes: str = ""

    @property
    def arch(self) -> str:
        return self.timm_name.split(".", 1)[0]


_SPECS = [
    ModelSpec("mae_vit_base", "vit_base_patch16_224.mae", "MIM", "MAE pre-training, no fine-tuning"),
    ModelSpec("mae_vit_large", "vit_large_patch16_224.mae", "MIM", "MAE pre-training"),
    ModelSpec("mae_vit_huge", "vit_huge_patch14_224.mae", "MIM", "MAE pre-training"),
    ModelSpec("ijepa_vit_huge", "vit_huge_patch14_gap_224.in1k_ijepa", "MIM", "I-JEPA; no class token"),
    ModelSpec(
        "eva02_mim_vit_base", "eva02_base_patch14_224.mim_in22k", "MIM", "EVA-02 MIM; rotary positions"
    ),
    ModelSpec(
        "beitv2_vit_base",
        "beitv2_base_patch16_224.in1k_ft_in22k_in1k",
        "MIM (fine-tuned)",
        "only fine-tuned BEiT-v2 weights are public; relative position bias",
    ),
    ModelSpec("dino_vit_small", "vit_small_patch16_224.dino", "JEA", "DINO"),
    ModelSpec("dino_vit_base", "vit_base_patch16_224.dino", "JEA", "DINO"),
    ModelSpec("dino_vit_small8", "vit_small_patch8_224.dino", "JEA", "DINO, patch 8"),
    ModelSpec("dino_vit_base8", "vit_base_patch8_224.dino", "JEA", "DINO, patch 8"),
    ModelSpec("dinov2_vit_small", "vit_small_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec("dinov2_vit_base", "vit_base_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec("dinov2_vit_large", "vit_large_patch14_dinov2.lvd142m", "JEA", "DINOv2; LayerScale; 518 px"),
    ModelSpec(
        "dinov2_reg_vit_small", "vit_small_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec(
        "dinov2_reg_vit_base", "vit_base_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec(
        "dinov2_reg_vit_large", "vit_large_patch14_reg4_dinov2.lvd142m", "JEA", "DINOv2 + 4 registers; 518 px"
    ),
    ModelSpec("dinov3_vit_small", "vit_small_patch16_dinov3.lvd1689m", "JEA", "DINOv3; 4 registers; rotary"),
    ModelSpec("dinov3_vit_base", "vit_base_patch16_dinov3.lvd1689m", "JEA", "DINOv3; 4 registers; rotary"),
    ModelSpec(
        "clip_vit_base", "vit_base_patch16_clip_224.openai", "language-supervised", "OpenAI CLIP image tower"
    ),
    ModelSpec(
        "supervised_vit_base",
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "supervised",
        "ImageNet-21k -> 1k supervised (AugReg2)",
    ),
]

MODEL_REGISTRY: dict[str, ModelSpec] = {s.alias: s for s in _SPECS}

# Short names researchers type; each points at a registry entry.
SHORT_ALIASES: dict[str, str] = {
    "mae": "mae_vit_base",
    "ijepa": "ijepa_vit_huge",
    "eva02": "eva02_mim_vit_base",
    "eva02_mim": "eva02_mim_vit_base",
    "beitv2": "beitv2_vit_base",
    "dino": "dino_vit_base",
    "dinov2": "dinov2_vit_base",
    "dinov2_reg": "dinov2_reg_vit_base",
    "dinov3": "dinov3_vit_base",
    "clip": "clip_vit_base",
    "supervised": "supervised_vit_base",
}


# timm's tiny ViTs (about 0.3-0.8 M parameters, 160 px): what tests, examples and a first
# offline try run on. Listed for `attnscope models`; they resolve as plain timm names.
TEST_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("test_vit", "test_vit", "test", "tiny ViT: [cls], 160 px; use with --random-init offline"),
    ModelSpec("test_vit2", "test_vit2", "test", "tiny ViT, another layout; use with --random-init offline"),
    ModelSpec("test_vit3", "test_vit3", "test", "tiny ViT, wider; use with --random-init offline"),
)


def list_model_specs() -> list[ModelSpec]:
    """Registered aliases in display order."""
    return list(_SPECS)


def aliases_of(spec: ModelSpec) -> list[str]:
    return [short for short, full in SHORT_ALIASES.items() if full == spec.alias]


def resolve_model_spec(name: str, family: str | None = None) -> ModelSpec:
    """Map an alias or any timm model name to a ModelSpec.

    Unknown names are checked against timm so a typo fails here, with suggestions,
    instead of deep inside model construction.
    """
    import timm

    if family is not None and family not in FAMILIES:
        raise AttnscopeError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    key = SHORT_ALIASES.get(name, name)
    spec = MODEL_REGISTRY.get(key)
    if spec is None:
        arch = name.split(".", 1)[0]
        if not timm.is_model(arch):
            choices = list(MODEL_REGISTRY) + list(SHORT_ALIASES) + timm.list_models()
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise AttnscopeError(
                f"unknown model {name!r}{hint}; see `attnscope models` or any timm model name"
            )
        spec = ModelSpec(alias=name, timm_name=name, family="unknown")
    if family is not None:
        spec = ModelSpec(spec.alias, spec.timm_name, family, spec.notes)
    return spec
