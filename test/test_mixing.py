"""Object-wise mixing (Eq. 8 of the data-free distillation paper)."""

from __future__ import annotations

import pytest
import torch

from depthkd_core.data.mixing import ObjectMixer, pair_partners


def _semantic() -> torch.Tensor:
    """Four 6x8 maps with known classes; map 3 has unlabelled (-1) pixels."""
    sem = torch.zeros(4, 6, 8, dtype=torch.int64)
    sem[0, :, :2], sem[0, :, 2:4], sem[0, :, 4:6], sem[0, :, 6:] = 0, 3, 5, 7
    sem[1] = 2
    sem[2, :2], sem[2, 2:4], sem[2, 4:] = 1, 2, 4
    sem[3, :3], sem[3, 3:5], sem[3, 5:] = -1, 0, 6
    return sem


PRESENT = [{0, 3, 5, 7}, {2}, {1, 2, 4}, {0, 6}]


def test_mask_covers_exactly_the_chosen_classes() -> None:
    sem = _semantic()
    images = torch.rand(4, 3, 6, 8)
    gen = torch.Generator().manual_seed(0)
    result = ObjectMixer(0.5)(images, sem, generator=gen)
    for b, present in enumerate(PRESENT):
        chosen = {int(c) for c in torch.nonzero(result.chosen[b]).flatten()}
        assert chosen <= present
        assert len(chosen) == max(1, len(present) // 2)  # half of the classes, at least one
        expected = torch.isin(sem[b], torch.tensor(sorted(chosen)))
        assert torch.equal(result.mask[b, 0].bool(), expected)
    assert not result.mask[3, 0, :3].bool().any()  # unlabelled pixels never come from x_a


def test_mixed_image_is_eq8() -> None:
    sem = _semantic()
    images = torch.rand(4, 3, 6, 8)
    result = ObjectMixer()(images, sem, generator=torch.Generator().manual_seed(1))
    partner = result.partner
    assert not torch.any(partner == torch.arange(4))  # x_b is another image of the batch
    assert sorted(partner.tolist()) == [0, 1, 2, 3]
    m = result.mask
    expected = m * images + (1 - m) * images[partner]
    assert torch.equal(result.images, expected)
    # where M = 1 the pixel is x_a's, elsewhere x_b's, bit for bit
    for b in range(4):
        keep = m[b, 0].bool()
        assert torch.equal(result.images[b][:, keep], images[b][:, keep])
        assert torch.equal(result.images[b][:, ~keep], images[partner[b]][:, ~keep])


def test_choice_is_random_across_draws() -> None:
    sem = _semantic()
    gen = torch.Generator().manual_seed(2)
    mixer = ObjectMixer()
    seen = {frozenset(torch.nonzero(mixer.choose_classes(sem, gen)[0]).flatten().tolist())
            for _ in range(40)}
    # C(4, 2) = 6 possible halves of image 0's classes; 40 draws see most of them
    assert len(seen) >= 4
    assert all(len(s) == 2 and s <= PRESENT[0] for s in seen)


def test_fraction_and_single_image() -> None:
    sem = _semantic()
    chosen = ObjectMixer(1.0).choose_classes(sem)
    assert [set(torch.nonzero(c).flatten().tolist()) for c in chosen] == PRESENT
    assert pair_partners(1).tolist() == [0]


def test_bad_input() -> None:
    images = torch.rand(2, 3, 6, 8)
    with pytest.raises(ValueError, match="semantic maps"):
        ObjectMixer()(images, torch.full((2, 6, 8), -1))
    with pytest.raises(ValueError, match="same size"):
        ObjectMixer()(images, torch.zeros(2, 5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="fraction"):
        ObjectMixer(0.0)
