import numpy as np
import pytest
from PIL import Image

from vit_spine.channels import apply_window
from vit_spine.preprocess import (
    PreprocessConfig,
    centered,
    field_of_view,
    preprocess_study,
    render_slice,
    resize_hu,
    stack_channels,
)


def pil_resize(image: np.ndarray, size: int) -> np.ndarray:
    """An independent antialiased bilinear resize (PIL) to check ours against."""
    return np.asarray(Image.fromarray(image.astype(np.float32), "F").resize((size, size), Image.BILINEAR))


def random_hu(rng: np.random.Generator, rows: int = 96, cols: int = 96) -> np.ndarray:
    return rng.uniform(-1100, 2000, (rows, cols)).astype(np.float32)


def test_window_maps_its_ends_to_0_and_255_and_clips():
    hu = np.array([-2000, -500, 400, 1300, 3000, 400 + 1800 / 255 * 0.49], np.float32)
    assert apply_window(hu, 400, 1800).tolist() == [0, 0, 128, 255, 255, 128]


@pytest.mark.parametrize("rows, cols, size", [(100, 120, 32), (512, 512, 224), (62, 62, 64), (40, 90, 64)])
def test_resize_matches_pil_and_torch_antialiased_bilinear(rows, cols, size):
    """Shrinking, growing (a crop smaller than the output) and non-square input."""
    import torch
    import torch.nn.functional as F

    hu = random_hu(np.random.default_rng(0), rows, cols)
    ours = resize_hu(hu, size)
    assert ours.shape == (size, size) and ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, pil_resize(hu, size), atol=0.05)
    reference = F.interpolate(torch.from_numpy(hu)[None, None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, reference, atol=0.05)


def test_bone25d_stacks_neighbouring_slices_in_the_bone_window():
    rng = np.random.default_rng(1)
    hu = [random_hu(rng) for _ in range(5)]
    config = PreprocessConfig(image_size=16)
    out = preprocess_study(hu, config)
    assert out.shape == (5, 3, 16, 16) and out.dtype == np.uint8
    expected = [apply_window(pil_resize(h, 16), 400, 1800) for h in hu]
    for i in range(5):
        # PIL and torch may round differently by one grey level where a value sits on .5
        assert np.abs(out[i, 1].astype(int) - expected[i]).max() <= 1
        assert np.array_equal(out[i, 0], out[max(i - 1, 0), 1])
        assert np.array_equal(out[i, 2], out[min(i + 1, 4), 1])


def test_neighbor_offset_reaches_further():
    hu = [np.full((8, 8), 100.0 * i, np.float32) for i in range(6)]
    out = preprocess_study(hu, PreprocessConfig(image_size=8, neighbor_offset=2))
    centre = out[:, 1, 0, 0]
    assert out[3, 0, 0, 0] == centre[1] and out[3, 2, 0, 0] == centre[5]
    assert out[0, 0, 0, 0] == centre[0] and out[5, 2, 0, 0] == centre[5]


def test_windows_scheme_renders_one_slice_in_three_windows():
    config = PreprocessConfig(image_size=8, channels="windows", windows="0:100,0:1000,1000:100")
    out = preprocess_study([np.full((12, 12), 40.0, np.float32)], config)
    assert out.shape == (1, 3, 8, 8)
    assert out[0, :, 0, 0].tolist() == [230, 138, 0]


def test_stack_channels_writes_into_a_given_buffer():
    config = PreprocessConfig(image_size=8)
    rendered = [render_slice(np.full((8, 8), v, np.float32), config) for v in (0.0, 500.0)]
    buffer = np.zeros((4, 3, 8, 8), np.uint8)
    out = stack_channels(rendered, config, out=buffer)
    assert out.shape == (2, 3, 8, 8) and np.shares_memory(out, buffer)
    assert np.array_equal(buffer[:2], preprocess_study([np.full((8, 8), v, np.float32) for v in (0.0, 500.0)], config))
    with pytest.raises(ValueError, match="out has shape"):
        stack_channels(rendered, config, out=np.zeros((1, 3, 8, 8), np.uint8))


def test_empty_study_gives_an_empty_array():
    assert preprocess_study([], PreprocessConfig(image_size=8)).shape == (0, 3, 8, 8)


def test_crop_keeps_the_centred_square_before_resizing():
    hu = random_hu(np.random.default_rng(3), 120, 120)
    window = centered(hu, *field_of_view(hu.shape, PreprocessConfig(crop=0.6)))
    assert window.shape == (72, 72) and np.shares_memory(window, hu)
    np.testing.assert_array_equal(window, hu[24:96, 24:96])
    config = PreprocessConfig(image_size=32, crop=0.6)
    expected = apply_window(pil_resize(hu[24:96, 24:96], 32), 400, 1800)
    assert np.abs(render_slice(hu, config)[0].astype(int) - expected).max() <= 1
    assert not np.array_equal(render_slice(hu, config), render_slice(hu, PreprocessConfig(image_size=32)))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--crop"):
            PreprocessConfig(crop=bad)


def test_a_non_square_slice_is_padded_with_air_never_stretched():
    """512 x 640 must not become a square by squeezing its columns: the rows are padded with air instead."""
    hu = random_hu(np.random.default_rng(4), 80, 100)
    padded = centered(hu, *field_of_view(hu.shape, PreprocessConfig()))
    assert padded.shape == (100, 100)
    np.testing.assert_array_equal(padded[10:90], hu)
    assert (padded[:10] == -1000).all() and (padded[90:] == -1000).all()
    config = PreprocessConfig(image_size=50)
    expected = apply_window(pil_resize(padded, 50), 400, 1800)
    assert np.abs(render_slice(hu, config)[0].astype(int) - expected).max() <= 1
    # a circle stays a circle: its rendered extent is the same along rows and columns
    yy, xx = np.ogrid[:80, :100]
    disc = np.where((yy - 39.5) ** 2 + (xx - 49.5) ** 2 <= 30**2, 1000.0, -1000.0).astype(np.float32)
    bright = render_slice(disc, config)[0] > 200
    rows, cols = np.nonzero(bright.any(axis=1))[0], np.nonzero(bright.any(axis=0))[0]
    assert len(rows) == len(cols) and abs(len(rows) - 30) <= 2  # 60 px wide at half scale, along both axes
    # and the crop is a square of the longer side too
    assert field_of_view((512, 640), PreprocessConfig(crop=0.5)) == (320, 320)


def test_pixel_spacing_resamples_a_fine_and_a_coarse_study_to_the_same_image(tmp_path):
    """The same phantom reconstructed at 0.3 mm (400 px, 120 mm across) and at 1.2 mm (200 px, 240 mm across),
    both centred on the neck: with --pixel_spacing both reach the model at the same scale; without it the
    0.3 mm study shows its anatomy twice as large."""
    from vit_spine.phantom import SeriesSpec, slice_hu

    fine = slice_hu(SeriesSpec(rows=400, columns=400, pixel_spacing=0.3), np.array([-59.85, -59.85, 0.0]))
    coarse = slice_hu(SeriesSpec(rows=200, columns=200, pixel_spacing=1.2), np.array([-119.4, -119.4, 0.0]))
    config = PreprocessConfig(image_size=64, pixel_spacing=1.5)  # 96 mm field of view
    a = render_slice(fine, config, (0.3, 0.3))[0].astype(int)
    b = render_slice(coarse, config, (1.2, 1.2))[0].astype(int)
    assert field_of_view(fine.shape, config, (0.3, 0.3)) == (320, 320)
    assert field_of_view(coarse.shape, config, (1.2, 1.2)) == (80, 80)
    difference = np.abs(a - b)
    assert difference.mean() < 1.5 and np.percentile(difference, 95) <= 8  # bone edges differ by blur only
    scaled = PreprocessConfig(image_size=64)
    unscaled = np.abs(render_slice(fine, scaled)[0].astype(int) - render_slice(coarse, scaled)[0].astype(int))
    assert unscaled.mean() > 20 * difference.mean()
    # anisotropic pixels: each axis is resampled by its own spacing
    assert field_of_view((100, 100), config, (1.2, 0.6)) == (80, 160)
    with pytest.raises(ValueError, match="needs the slice's PixelSpacing"):
        render_slice(fine, config, None)
    with pytest.raises(ValueError, match="--crop or --pixel_spacing"):
        PreprocessConfig(crop=0.5, pixel_spacing=0.5)
    with pytest.raises(ValueError, match="--pixel_spacing must be a positive"):
        PreprocessConfig(pixel_spacing=0)


def test_config_round_trips_and_rejects_bad_values():
    config = PreprocessConfig(image_size=64, channels="windows", windows="1:2,3:4,5:6")
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    assert config.stored_channels() == 3 and config.channel_layout() == ((0, 0), (0, 1), (0, 2))
    with pytest.raises(ValueError, match="unknown preprocessing option"):
        PreprocessConfig.from_dict({**config.to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="^--channels 'rgb': not a channel scheme; known: bone25d, windows$"):
        PreprocessConfig(channels="rgb")
    with pytest.raises(ValueError, match="not CENTER:WIDTH"):
        PreprocessConfig(bone_window="bone")
    with pytest.raises(ValueError, match="three CENTER:WIDTH"):
        PreprocessConfig(windows="400:1800")
    with pytest.raises(ValueError, match="positive"):
        PreprocessConfig(bone_window="400:0")
