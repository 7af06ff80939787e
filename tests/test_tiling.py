"""Tiled inference: exact against the whole-image forward, no seams, bounded tiles, and the helpers."""

import numpy as np
import pytest
import torch
from skimage import data

from restoration.models.restorer import Restorer, RestorerConfig
from restoration.tiling import feather_window, tile_positions, tiled_apply


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny convs: thread hand-offs would dominate on a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_restorer(arch: str, channels: int, depth: int = 5) -> Restorer:
    """Random-init restorer of depth 5 with non-trivial BN statistics, in eval mode, BN folded."""
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(arch=arch, channels=channels, depth=depth, width=16))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval().fold_batch_norm()


def noisy_pair(clean: np.ndarray, sigma: float = 25.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) as (1, C, H, W) float32 in [0, 1] (noise not clipped), from an (H, W) or (H, W, C) uint8 array."""
    x = torch.from_numpy(clean.astype(np.float32) / 255.0)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    gen = torch.Generator().manual_seed(0)
    return x, x + sigma / 255.0 * torch.randn(x.shape, generator=gen)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


def tiles_used(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """(row, col, h, w) of every tile tiled_apply cuts, read back from an image whose channels are pixel coordinates."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    tiles = []

    def record(t):
        tiles.append((int(t[0, 0, 0, 0]), int(t[0, 1, 0, 0]), *t.shape[-2:]))
        return t

    tiled_apply(record, torch.stack([rows, cols])[None], tile=tile, overlap=overlap, align=align)
    return tiles


def border_mask(height: int, width: int, tile: int, overlap: int, band: int = 2) -> torch.Tensor:
    """True within `band` px of an edge of any tile (the image's own border excluded: it is not a seam)."""
    edges = torch.zeros(height, width, dtype=torch.bool)
    for r0, c0, h, w in tiles_used(height, width, tile, overlap):
        for r in {r0, r0 + h - 1} - {0, height - 1}:
            edges[max(r - band, 0) : r + band + 1, c0 : c0 + w] = True
        for c in {c0, c0 + w - 1} - {0, width - 1}:
            edges[r0 : r0 + h, max(c - band, 0) : c + band + 1] = True
    return edges


def test_tiled_restorer_equals_whole_image_forward_on_a_real_photo():
    model = small_restorer("dncnn", 1)
    clean, noisy = noisy_pair(data.camera()[100:250, 150:350])  # (1, 1, 150, 200)
    assert model.receptive_radius <= 16
    with torch.inference_mode():
        whole = model(noisy)
        tiled = tiled_apply(model, noisy, tile=64, overlap=16)
    assert tiled.shape == whole.shape == noisy.shape
    assert abs(psnr(tiled, clean) - psnr(whole, clean)) < 0.05
    assert (tiled - whole).abs().max() < 1e-5

    # Seams: the difference along tile edges is no larger than elsewhere (both are float rounding only).
    diff = (tiled - whole).abs()[0, 0]
    edges = border_mask(150, 200, tile=64, overlap=16)
    assert edges.any() and (~edges).any()
    assert diff[edges].max() <= diff[~edges].max() + 1e-6


def test_without_context_the_seams_show_which_is_what_overlap_prevents():
    model = small_restorer("dncnn", 1)
    _, noisy = noisy_pair(data.camera()[100:250, 150:350])
    with torch.inference_mode():
        whole = model(noisy)
        tiled = tiled_apply(model, noisy, tile=64, overlap=0)
    diff = (tiled - whole).abs()[0, 0]
    edges = border_mask(150, 200, tile=64, overlap=0, band=model.receptive_radius)
    # Tiles cut without context are wrong near their edges and exact further inside.
    assert diff[edges].max() > 1e-2
    assert diff[~edges].max() < 1e-5


@pytest.mark.parametrize("align", [2, 1])
def test_fast_arch_needs_tiles_aligned_to_its_pixel_unshuffle_grid(align):
    model = small_restorer("fast", 3)
    _, noisy = noisy_pair(data.astronaut()[40:191, 100:303])  # (1, 3, 151, 203): odd sizes
    overlap = model.receptive_radius  # 11
    with torch.inference_mode():
        whole = model(noisy)
        tiled = tiled_apply(model, noisy, tile=64, overlap=overlap, align=align)
    err = (tiled - whole).abs().max()
    odd_starts = [t for t in tiles_used(151, 203, 64, overlap, align) if t[0] % 2 or t[1] % 2]
    if align == 2:
        assert not odd_starts
        assert err < 1e-5
    else:
        # Unaligned, some tiles start at odd offsets and see a shifted 2x2 grid: valid output, but not the same.
        assert odd_starts
        assert err > 1e-3


def test_unet_tiles_aligned_to_its_grid_with_its_radius_as_overlap_are_exact():
    model = small_restorer("unet", 3, depth=3)  # 3 levels: grid 4, radius 28
    _, noisy = noisy_pair(data.astronaut()[::2, ::2])  # (1, 3, 256, 256)
    noisy = noisy[..., 3:250, 5:256]  # sizes off the grid: (1, 3, 247, 251)
    assert (model.downscale, model.receptive_radius) == (4, 28)
    with torch.inference_mode():
        whole = model(noisy)
        tiled = tiled_apply(model, noisy, tile=96, overlap=model.receptive_radius, align=model.downscale)
        short = tiled_apply(model, noisy, tile=96, overlap=8, align=model.downscale)
    assert len(tiles_used(247, 251, 96, model.receptive_radius, 4)) > 4
    assert (tiled - whole).abs().max() < 1e-5
    assert (short - whole).abs().max() > 1e-3  # too little context: the U-Net sees far


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_an_upscaler_is_tiled_on_its_input_and_blended_on_its_output_without_seams(scale):
    """A conv net with a pixel-shuffle tail (radius 3 on the input): tiles of its input, blended on the scale-times
    larger output, give the whole-image output exactly; with too little context the seams show."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, scale * scale, 3, padding=1),
        torch.nn.PixelShuffle(scale),
    ).eval()
    x = torch.from_numpy(data.camera()[:100, :130].astype(np.float32) / 255)[None, None]  # (1, 1, 100, 130)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_apply(net, x, tile=40, overlap=4, scale=scale)
        seamy = tiled_apply(net, x, tile=40, overlap=1, scale=scale)
    assert tiled.shape == (1, 1, 100 * scale, 130 * scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    assert (seamy - whole).abs().max() > 1e-3


def test_colour_batch_and_tiles_never_larger_than_tile():
    model = small_restorer("dncnn", 3)
    _, noisy = noisy_pair(data.astronaut()[::3, ::3])  # (1, 3, 171, 171)
    batch = torch.cat([noisy, noisy.flip(-1)])  # (2, 3, 171, 171)
    shapes = []

    def fn(t):
        shapes.append(tuple(t.shape))
        return model(t)

    with torch.inference_mode():
        tiled = tiled_apply(fn, batch, tile=48, overlap=8)
        whole = model(batch)
    assert len(shapes) > 4
    assert all(s[:2] == (2, 3) and s[2] <= 48 and s[3] <= 48 for s in shapes)
    assert (tiled - whole).abs().max() < 1e-5


def test_identity_returns_the_image_exactly():
    image = torch.rand(2, 3, 100, 77, generator=torch.Generator().manual_seed(3))
    out = tiled_apply(lambda t: t, image, tile=32, overlap=4)
    assert out.dtype == image.dtype
    assert (out - image).abs().max() < 1e-6


def test_fn_output_dtype_and_channels_are_kept():
    image = torch.rand(1, 3, 90, 90)
    out = tiled_apply(lambda t: t.mean(1, keepdim=True).to(torch.float16), image, tile=40, overlap=6)
    assert out.shape == (1, 1, 90, 90) and out.dtype == torch.float16
    assert (out.float() - image.mean(1, keepdim=True)).abs().max() < 1e-3


def test_a_small_image_is_processed_in_one_call():
    image = torch.rand(1, 1, 50, 64)
    calls = []
    result = tiled_apply(lambda t: calls.append(t) or t * 2, image, tile=64, overlap=16)
    assert len(calls) == 1 and calls[0] is image
    assert torch.equal(result, image * 2)


def test_validation_names_the_values():
    image = torch.rand(1, 1, 100, 100)
    with pytest.raises(ValueError, match="tile=32, overlap=16"):
        tiled_apply(lambda t: t, image, tile=32, overlap=16)
    with pytest.raises(ValueError, match="tile=32, overlap=-1"):
        tiled_apply(lambda t: t, image, tile=32, overlap=-1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got \(100, 100\)"):
        tiled_apply(lambda t: t, image[0, 0], tile=32, overlap=4)
    with pytest.raises(ValueError, match="mapped a tile of shape"):
        tiled_apply(lambda t: t[..., :-1, :], image, tile=32, overlap=4)


@pytest.mark.parametrize("tile", [8, 64])
@pytest.mark.parametrize("overlap", [0, 3])
@pytest.mark.parametrize("length_kind", ["one", "tile", "tile+1", "1000"])
def test_tile_positions_cover_everything(length_kind, tile, overlap):
    length = {"one": 1, "tile": tile, "tile+1": tile + 1, "1000": 1000}[length_kind]
    starts = tile_positions(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] == max(0, length - tile)
    assert starts == sorted(set(starts))
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap
    if length > tile:
        # Not wasteful: one tile fewer could not cover the axis with this overlap.
        assert (len(starts) - 2) * (tile - overlap) + tile < length


def test_tile_positions_validation():
    with pytest.raises(ValueError, match="overlap=8 must satisfy 0 <= overlap < tile=8"):
        tile_positions(100, 8, 8)
    with pytest.raises(ValueError, match="length=0"):
        tile_positions(0, 8, 2)


def test_feather_window_ramps_strictly_positive_and_flat_inside():
    w = feather_window(40, 30, 8)
    assert w.shape == (40, 30)
    assert (w > 0).all() and w.max() == 1
    assert torch.equal(w[8:-8, 8:-8], torch.ones(24, 14))
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    ramp = w[:8, 20]
    assert (ramp[1:] > ramp[:-1]).all()
    # Two facing ramps of a crossfade sum to 1, so blended regions keep their brightness.
    assert torch.allclose(ramp + ramp.flip(0), torch.ones(8))
    assert torch.equal(feather_window(5, 5, 0), torch.ones(5, 5))
    assert feather_window(4, 4, 2, dtype=torch.float64).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiles_run_on_the_image_device():
    model = small_restorer("dncnn", 1)
    _, noisy = noisy_pair(data.camera()[:200, :150])
    with torch.inference_mode():
        cpu = tiled_apply(model, noisy, tile=64, overlap=16)
        gpu = tiled_apply(model.to("cuda"), noisy.to("cuda"), tile=64, overlap=16)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-4
