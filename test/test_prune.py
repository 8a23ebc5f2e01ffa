"""models/prune.py: a narrower FastDepth holding a wide one's channels, and the recipe's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_FASTDEPTH

from depthkd_core.models import ModelConfig, build_model, load_checkpoint, save_checkpoint
from depthkd_core.models.fastdepth import FastDepthNet
from depthkd_core.models.prune import channel_importance, prune_fastdepth, widths_by_stride

WIDE = {"encoder_channels": (8, 16, 16, 24, 24, 32, 32, 32, 32, 32, 32, 32, 48, 48),
        "decoder_channels": (32, 32, 24, 16, 8)}


def _wide(seed: int = 0, scale_head: int = 0) -> FastDepthNet:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="fastdepth", **WIDE, scale_head=scale_head)).eval()
    with torch.no_grad():  # each conv a positive weighted mean: no channel dead on every image
        for conv in model.convs_and_caps()[0][:-1]:
            conv.weight.abs_().div_(conv.weight.sum((1, 2, 3), keepdim=True))
            conv.bias.uniform_(0.0, 0.2)
    return model


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_the_same_widths_give_the_same_network() -> None:
    model = _wide()
    same = prune_fastdepth(model, WIDE["encoder_channels"], WIDE["decoder_channels"], _images(),
                           refit=False).eval()
    x = _images(2, seed=5)
    assert torch.equal(same(x), model(x))


def test_a_trained_scale_head_is_kept_for_the_channels_kept() -> None:
    model = _wide(scale_head=4)
    with torch.no_grad():  # as if trained: the head no longer gives exactly 1
        for layer in (model.scale.mlp[0], model.scale.mlp[-1]):
            layer.weight.normal_(0.0, 0.5)
            layer.bias.normal_(0.0, 0.5)
    x = _images(2, seed=5)
    same = prune_fastdepth(model, WIDE["encoder_channels"], WIDE["decoder_channels"], _images(),
                           refit=False).eval()
    assert torch.equal(same(x), model(x))
    narrower = tuple(c - 8 if i == 13 else c for i, c in enumerate(WIDE["encoder_channels"]))
    pruned = prune_fastdepth(model, narrower, WIDE["decoder_channels"], _images(), refit=False)
    assert pruned.scale.mlp[0].weight.shape == (4, narrower[-1])
    torch.testing.assert_close(pruned.scale.mlp[-1].weight, model.scale.mlp[-1].weight)


def test_channels_nothing_reads_are_the_ones_removed_and_change_nothing() -> None:
    """Cut every consumer's weight to two channels of every space (the shared skip spaces
    on both sides): those channels score 0, pruning removes exactly them, and the pruned
    network computes what the wide one does."""
    model = _wide()
    convs, _ = model.convs_and_caps()
    # graph order: stem, block i's depthwise and pointwise at 2i-1 and 2i, decoder stage s's
    # at 25+2s and 26+2s, the output conv last; a pointwise column is what reads a channel
    readers = [convs[2 * i + 2] for i in range(13)] + [convs[26 + 2 * s] for s in range(1, 6)]
    with torch.no_grad():
        for conv in [*readers, convs[-1]]:  # E0..E12, E13 and D1..D4 (stages 1..5), D5
            conv.weight[:, [1, 3]] = 0.0
    importance = channel_importance(model, _images())
    assert sorted(importance) == sorted([f"E{i}" for i in range(14)] + ["D1", "D5"])
    for space, score in importance.items():
        assert torch.nonzero(score == 0).flatten().tolist() == [1, 3], space
    encoder = tuple(c - 2 for c in WIDE["encoder_channels"])
    decoder = tuple(c - 2 for c in WIDE["decoder_channels"])
    pruned = prune_fastdepth(model, encoder, decoder, _images(), refit=False).eval()
    x = _images(2, seed=7)
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)


def test_refitting_brings_the_pruned_network_closer_to_the_wide_one() -> None:
    model = _wide()
    widths = widths_by_stride(model, {2: 0.5, 4: 0.5, 8: 0.5, 16: 0.5})
    # rounded to 8 (E1: 16 -> 8), stride 32 kept (E12: 48), the skips shared (D2 = E5)
    assert widths[0][1] == 8 and widths[0][12] == 48 and widths[1][1] == widths[0][5] == 16
    x = _images(4, seed=9)  # not the images pruned on
    errors = {}
    for refit in (False, True):
        pruned = prune_fastdepth(model, *widths, _images(16), refit=refit).eval()
        errors[refit] = (pruned(x).log() - model(x).log()).pow(2).mean().sqrt().item()
    assert errors[True] < 0.5 * errors[False], errors


def test_pruning_only_removes_channels() -> None:
    model = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH))
    with pytest.raises(ValueError, match="only removes channels"):
        prune_fastdepth(model, (16,) * 14, (16,) * 5, _images(), refit=False)
    with pytest.raises(ValueError, match="prune ratio for stride 4"):
        widths_by_stride(model, {4: 1.5})


def test_widths_round_to_the_multiple_only_at_the_strides_pruned() -> None:
    """With ONNX Runtime's 16-channel blocks in mind (``prune_multiple``): a pruned stride's
    widths are multiples of 16; a stride not named keeps its width even when it is not one
    (40 at stride 8 would round down to 32)."""
    model = build_model(ModelConfig(name="fastdepth",
                                    encoder_channels=(8, 16, 16, 24, 40, 40, 32, 32, 32, 32, 32, 32, 48, 48),
                                    decoder_channels=(32, 40, 24, 16, 8)))
    encoder, decoder = widths_by_stride(model, {4: 0.9, 16: 0.9}, multiple=16)
    assert encoder[2:4] == (16, 16) and encoder[6:12] == (32,) * 6  # strides 4 and 16: 16s
    assert encoder[4:6] == (40, 40) and decoder[1] == 40  # stride 8 and its skip: kept
    assert encoder[:2] == (8, 16) and encoder[12:] == (48, 48)


def test_a_pruned_checkpoint_is_a_fastdepth_pretrained(tmp_path: Path) -> None:
    model = _wide()
    pruned = prune_fastdepth(model, *widths_by_stride(model, {2: 0.5, 16: 0.5}), _images())
    path = save_checkpoint(tmp_path / "pruned.pt", pruned, pruned.cfg)
    _, cfg, _ = load_checkpoint(path)
    rebuilt = build_model(ModelConfig(**{**vars(cfg), "pretrained": str(path)})).eval()
    x = _images(1)
    assert torch.equal(rebuilt(x), pruned.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        build_model(ModelConfig(name="fastdepth", **WIDE, pretrained=str(path)))


def test_the_recipe_prunes_the_teacher_on_transfer_frames(tmp_path: Path) -> None:
    from depthkd_core.data.simulator import write_dataset
    from depthkd_core.recipe import StudentRecipe, pruned_teacher

    data = write_dataset(tmp_path / "sim", "target", 3, 64, 64, seed=1, workers=1)
    ratios = {2: 0.5, 8: 0.5}
    recipe = StudentRecipe(teacher="t.onnx", distill="d.yaml", init_from_teacher=True,
                           prune_ratios=ratios, prune_images=2, sim_height=64, sim_width=64)
    cfg = pruned_teacher(ModelConfig(name="fastdepth", **WIDE), recipe, data, tmp_path / "p.pt")
    assert cfg.pretrained == str(tmp_path / "p.pt")
    assert (cfg.encoder_channels, cfg.decoder_channels) == widths_by_stride(_wide(), ratios)
    assert cfg.encoder_channels[5] == 16 and cfg.encoder_channels[6] == 32  # stride 8 cut, 16 not
    _, _, extra = load_checkpoint(tmp_path / "p.pt")
    assert extra["prune_ratios"] == ratios and extra["prune_images"] == 2
    assert extra["prune_multiple"] == 8
    with pytest.raises(ValueError, match="init_from_teacher"):
        StudentRecipe(teacher="t.onnx", distill="d.yaml", prune_ratios=ratios)
    with pytest.raises(ValueError, match="prune_multiple"):
        StudentRecipe(teacher="t.onnx", distill="d.yaml", init_from_teacher=True,
                      prune_ratios=ratios, prune_multiple=0)


def test_a_cut_decoder_keeps_every_weight_and_fits_its_new_output_conv() -> None:
    """Cut after stage 3: the encoder and the kept stages are the wide network's, the depth
    comes from a stride-4 grid (bilinear to the input size), and the fitted output conv
    reproduces the wide network's depth far better than the one it was built with."""
    from depthkd_core.models.prune import cut_decoder

    model = _wide()
    images = _images(16)
    cut = cut_decoder(model, 3, images).eval()
    assert cut.cfg.decoder_stages == 3 and len(cut.decoder) == 3
    assert cut.out.in_channels == WIDE["decoder_channels"][2]
    for key, value in cut.state_dict().items():
        if not key.startswith("out."):
            assert torch.equal(value, model.state_dict()[key]), key
    x = _images(4, seed=9)  # not the images fitted on
    out = cut.forward_dict(x)
    assert out["depth"].shape == (4, 1, 64, 64) and out["decoder_features"][-1].shape[-1] == 16
    unfitted = FastDepthNet(cut.cfg).eval()
    unfitted.load_state_dict({k: v for k, v in cut.state_dict().items() if not k.startswith("out.")},
                             strict=False)
    errors = {name: (net(x).log() - model(x).log()).pow(2).mean().sqrt().item()
              for name, net in (("fitted", cut), ("unfitted", unfitted))}
    assert errors["fitted"] < 0.2 * errors["unfitted"], errors
    with pytest.raises(ValueError, match="cannot cut a decoder of 3 stages to 4"):
        cut_decoder(cut, 4, images)


def test_the_recipe_cuts_the_teacher_and_a_cut_model_reloads(tmp_path: Path) -> None:
    from depthkd_core.data.simulator import write_dataset
    from depthkd_core.recipe import StudentRecipe, pruned_teacher

    data = write_dataset(tmp_path / "sim", "target", 3, 64, 64, seed=1, workers=1)
    recipe = StudentRecipe(teacher="t.onnx", distill="d.yaml", init_from_teacher=True,
                           prune_images=2, sim_height=64, sim_width=64)
    cfg = pruned_teacher(ModelConfig(name="fastdepth", **WIDE, decoder_stages=2), recipe, data,
                         tmp_path / "p.pt")
    assert cfg.decoder_stages == 2 and cfg.decoder_channels == WIDE["decoder_channels"]
    _, _, extra = load_checkpoint(tmp_path / "p.pt")
    assert extra["decoder_stages"] == 2 and extra["prune_ratios"] == {}
    rebuilt = build_model(cfg).eval()
    assert len(rebuilt.decoder) == 2 and rebuilt(_images(1)).shape == (1, 1, 64, 64)
