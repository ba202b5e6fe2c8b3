"""Tests of datasets/: image reading, preprocessing, MVTec layout, loader, generator, converter."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, InputError
from datasets import (
    MVTEC_CATEGORIES,
    OBJECTS,
    TEXTURES,
    AnomalyDataset,
    BatchLoader,
    Preprocess,
    Sample,
    denormalize,
    has_masks,
    list_samples,
    magnetic_tile,
    read_image,
    read_mask,
    resolve_categories,
    shard_indices,
    synthetic,
)


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(h: int, w: int, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- read_image


def test_read_image_converts_8_bit_modes(tmp_path):
    gray = np.array([[0, 7], [128, 255]], np.uint8)
    out = read_image(save(gray, tmp_path / "l.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert (out == gray[:, :, None]).all()

    la = np.array([[[10, 0], [20, 255]]], np.uint8)
    assert read_image(save(la, tmp_path / "la.png")).tolist() == [[[10, 10, 10], [20, 20, 20]]]

    rgba = np.array([[[1, 2, 3, 0], [200, 100, 50, 255]]], np.uint8)
    assert read_image(save(rgba, tmp_path / "rgba.png")).tolist() == [[[1, 2, 3], [200, 100, 50]]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 10, 20] + [0] * 762)
    pal.putdata([1, 0])
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[255, 10, 20], [0, 0, 0]]]

    bits = Image.new("1", (2, 1))
    bits.putdata([0, 1])
    bits.save(tmp_path / "one.png")
    assert read_image(tmp_path / "one.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 0, 0, 255)])
    cmyk.save(tmp_path / "cmyk.tiff")
    assert read_image(tmp_path / "cmyk.tiff").tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_read_image_scales_16_bit_and_32_bit(tmp_path):
    sixteen = np.array([[0, 65535, 257 * 3, 257 * 200, 128, 129]], np.uint16)
    path = save(sixteen, tmp_path / "i16.png")
    with Image.open(path) as written:
        assert written.mode == "I;16"
    assert read_image(path)[0, :, 0].tolist() == [0, 255, 3, 200, 0, 1]
    big_endian = Image.fromarray(sixteen.astype(">u2"))
    assert big_endian.mode == "I;16B"
    big_endian.save(tmp_path / "i16b.tiff")
    assert read_image(tmp_path / "i16b.tiff")[0, :, 0].tolist() == [0, 255, 3, 200, 0, 1]

    small_int = save(np.array([[0, 9, 255]], np.int32), tmp_path / "i8.tiff")
    assert read_image(small_int)[0, :, 1].tolist() == [0, 9, 255]
    wide_int = save(np.array([[0, 514, 65535]], np.int32), tmp_path / "i32.tiff")
    assert read_image(wide_int)[0, :, 2].tolist() == [0, 2, 255]
    negative = save(np.array([[-100, 0, 300]], np.int32), tmp_path / "neg.tiff")
    assert read_image(negative)[0, :, 0].tolist() == [0, 64, 255]

    in_range = save(np.array([[0.4, 2.6, 255.0]], np.float32), tmp_path / "f8.tiff")
    assert read_image(in_range)[0, :, 0].tolist() == [0, 3, 255]
    stretched = save(np.array([[-1.0, 0.0, 1.0]], np.float32), tmp_path / "f.tiff")
    assert read_image(stretched)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("kind", ["truncated_jpeg", "random_bytes", "missing", "folder", "empty"])
@pytest.mark.bad_input
def test_read_image_failures_name_the_file(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    if kind == "truncated_jpeg":
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path = tmp_path / "empty.pgm"
        path.write_bytes(b"P5\n0 0\n255\n")
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read image (") and "\n" not in message
    assert message.endswith("replace or remove the file")


@pytest.mark.bad_input
def test_read_mask_any_mode(tmp_path):
    values = np.array([[0, 1], [255, 0]], np.uint8)
    assert read_mask(save(values, tmp_path / "l.png")).tolist() == [[False, True], [True, False]]

    colour = np.zeros((1, 3, 3), np.uint8)
    colour[0, 1, 1] = 9
    assert read_mask(save(colour, tmp_path / "rgb.png")).tolist() == [[False, True, False]]

    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, 0] = 255
    assert read_mask(save(rgba, tmp_path / "rgba.png")).tolist() == [[False, True]]

    gray_alpha = np.array([[[0, 255], [5, 0]]], np.uint8)
    assert read_mask(save(gray_alpha, tmp_path / "la.png")).tolist() == [[False, True]]

    wide = save(np.array([[0, 300]], np.uint16), tmp_path / "i16.png")
    mask = read_mask(wide)
    assert mask.dtype == bool and mask.tolist() == [[False, True]]

    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad_mask.png: cannot read mask"):
        read_mask(tmp_path / "bad_mask.png")


# --------------------------------------------------------------------------- Preprocess


def test_preprocess_normalises_constant_image():
    image = np.empty((13, 7, 3), np.uint8)
    image[...] = (255, 0, 128)
    out = Preprocess(resize=8, crop_size=4)(image)
    assert out.dtype == np.float32 and out.shape == (3, 4, 4)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert np.allclose(out, np.array(expected, np.float32)[:, None, None], atol=1e-6)
    assert out.flags.c_contiguous


def test_preprocess_centre_crop_offsets():
    y, x = np.mgrid[0:10, 0:10]
    image = np.stack([10 * y + x, 20 * x, 20 * y], axis=2).astype(np.uint8)
    pre = Preprocess(resize=10, crop_size=6)
    assert pre.size == 6
    out = pre(image)
    assert out.shape == (3, 6, 6)
    assert (denormalize(out) == image[2:8, 2:8]).all()
    r = image[2, 3, 0] / 255
    assert out[0, 0, 1] == pytest.approx((r - 0.485) / 0.229, abs=1e-6)


@pytest.mark.bad_input
def test_preprocess_sizes():
    assert Preprocess(resize=32).size == 32
    assert Preprocess().size == 256
    with pytest.raises(ConfigError, match="crop_size=300 is larger than resize=256"):
        Preprocess(resize=256, crop_size=300)
    with pytest.raises(ConfigError):
        Preprocess(resize=0)


def test_preprocess_mask_nearest_and_cropped():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    out = Preprocess(resize=6, crop_size=4).mask(mask)
    expected = np.zeros((4, 4), np.uint8)
    expected[1:3, 1:3] = 1
    assert out.dtype == np.uint8 and (out == expected).all()

    corner = np.array([[1, 0], [0, 0]], bool)
    assert Preprocess(resize=4).mask(corner).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    noisy = np.random.default_rng(1).random((37, 53)) > 0.7
    down = Preprocess(resize=16, crop_size=12).mask(noisy)
    assert down.shape == (12, 12) and set(np.unique(down)) <= {0, 1}


def test_denormalize_inverts_preprocess():
    image = np.random.default_rng(2).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    back = denormalize(Preprocess(resize=5)(image))
    assert back.dtype == np.uint8 and (back == image).all()


# --------------------------------------------------------------------------- MVTec layout


def make_category(root: Path, name: str, train: int = 2) -> Path:
    for i in range(train):
        save(rgb(4, 4), root / name / "train" / "good" / f"{i:03d}.png")
    return root / name


def test_resolve_categories_spec_forms(tmp_path):
    for name in ("wood", "bottle", "zeta", "alpha"):
        make_category(tmp_path, name)
    (tmp_path / "no_train").mkdir()
    (tmp_path / ".hidden" / "train" / "good").mkdir(parents=True)
    assert resolve_categories(tmp_path, "bottle") == ["bottle"]
    assert resolve_categories(tmp_path, " zeta, bottle,zeta ,alpha") == ["zeta", "bottle", "alpha"]
    assert resolve_categories(tmp_path, "all") == ["alpha", "bottle", "wood", "zeta"]
    assert resolve_categories(str(tmp_path), "all,zeta") == ["alpha", "bottle", "wood", "zeta"]


def test_resolve_categories_mvtec_groups(tmp_path):
    for name in MVTEC_CATEGORIES + ("extra",):
        make_category(tmp_path, name, train=0)
        (tmp_path / name / "train" / "good").mkdir(parents=True, exist_ok=True)
    assert resolve_categories(tmp_path, "all") == list(MVTEC_CATEGORIES)
    assert resolve_categories(tmp_path, "textures") == list(TEXTURES)
    assert resolve_categories(tmp_path, "objects,textures") == list(OBJECTS + TEXTURES)


@pytest.mark.bad_input
def test_resolve_categories_errors(tmp_path):
    with pytest.raises(InputError, match="dataset root not found"):
        resolve_categories(tmp_path / "missing", "all")
    with pytest.raises(InputError, match="no category folders with train/good found"):
        resolve_categories(tmp_path, "all")
    make_category(tmp_path, "wood")
    make_category(tmp_path, "mine")
    with pytest.raises(InputError) as info:
        resolve_categories(tmp_path, "wood,cable")
    assert str(info.value).startswith(str(tmp_path / "cable" / "train" / "good"))
    assert "categories found: mine, wood" in str(info.value)
    with pytest.raises(InputError, match="carpet"):
        resolve_categories(tmp_path, "textures")
    with pytest.raises(InputError, match="category spec ' , ' is empty"):
        resolve_categories(tmp_path, " , ")


def make_test_tree(root: Path) -> Path:
    base = make_category(root, "cat", train=0)
    for name in ("b.png", "a.PNG", "c.jpg", "notes.txt", "._a.png"):
        target = base / "train" / "good" / name
        if name.endswith("txt") or name.startswith("."):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"junk")
        else:
            save(rgb(8, 6), target)
    for folder, names in {"scratch": ["2", "1"], "good": ["0"], "bent": ["9"]}.items():
        for stem in names:
            save(rgb(8, 6), base / "test" / folder / f"{stem}.png")
    mask = np.zeros((8, 6), np.uint8)
    mask[:4, :3] = 255
    save(mask, base / "ground_truth" / "scratch" / "1_mask.png")
    save(mask, base / "ground_truth" / "bent" / "9_mask.png")
    return base


def test_list_samples_order_and_masks(tmp_path):
    base = make_test_tree(tmp_path)
    train = list_samples(tmp_path, "cat", "train")
    assert [s.path.name for s in train] == ["a.PNG", "b.png", "c.jpg"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)

    test = list_samples(tmp_path, "cat", "test")
    assert [(s.defect, s.path.name, s.label) for s in test] == [
        ("bent", "9.png", 1),
        ("good", "0.png", 0),
        ("scratch", "1.png", 1),
        ("scratch", "2.png", 1),
    ]
    gt = base / "ground_truth"
    assert [s.mask_path for s in test] == [
        gt / "bent" / "9_mask.png",
        None,
        gt / "scratch" / "1_mask.png",
        None,
    ]
    assert not has_masks(test)
    assert has_masks([s for s in test if s.path.name != "2.png"])
    assert not has_masks(train)


@pytest.mark.bad_input
def test_list_samples_missing_folders(tmp_path):
    with pytest.raises(InputError) as info:
        list_samples(tmp_path, "x", "train")
    assert str(info.value) == (
        f"{tmp_path / 'x' / 'train' / 'good'}: no images found; "
        "put the defect-free training images there"
    )
    make_category(tmp_path, "x")
    with pytest.raises(InputError, match="test: no test folders found"):
        list_samples(tmp_path, "x", "test")
    (tmp_path / "x" / "test" / "crack").mkdir(parents=True)
    with pytest.raises(InputError, match="crack: no images found"):
        list_samples(tmp_path, "x", "test")
    with pytest.raises(ValueError):
        list_samples(tmp_path, "x", "val")


def test_anomaly_dataset_items(tmp_path):
    make_test_tree(tmp_path)
    dataset = AnomalyDataset(list_samples(tmp_path, "cat", "test"), Preprocess(resize=4))
    assert len(dataset) == 4
    bent, good, masked, unmasked = (dataset[i] for i in range(4))
    assert bent["image"].dtype == np.float32 and bent["image"].shape == (3, 4, 4)
    assert bent["label"] == 1 and bent["path"] == str(tmp_path / "cat" / "test" / "bent" / "9.png")
    assert bent["mask"].dtype == np.uint8
    assert bent["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert good["mask"].tolist() == np.zeros((4, 4)).tolist() and good["label"] == 0
    assert masked["mask"].sum() == 4
    assert unmasked["mask"] is None and unmasked["label"] == 1


@pytest.mark.bad_input
def test_anomaly_dataset_mask_size_mismatch(tmp_path):
    image = save(rgb(8, 6), tmp_path / "img.png")
    mask = save(np.zeros((5, 7), np.uint8), tmp_path / "img_mask.png")
    dataset = AnomalyDataset([Sample(image, 1, "crack", mask)], Preprocess(resize=4))
    with pytest.raises(InputError) as info:
        dataset[0]
    assert str(info.value).startswith(f"{mask}: mask is 7x5 but image {image} is 6x8; ")


# --------------------------------------------------------------------------- BatchLoader


class CountingDataset:
    """Items of size 2; counts items started (by __getitem__) and released (by the test)."""

    def __init__(self, n: int, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.n, self.delay, self.fail_at = n, delay, fail_at
        self.error = InputError("bad/item.png: cannot read image (broken); replace it")
        self.lock = threading.Lock()
        self.started = self.released = self.max_alive = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        with self.lock:
            self.started += 1
            self.max_alive = max(self.max_alive, self.started - self.released)
        time.sleep(self.delay)
        if i == self.fail_at:
            raise self.error
        mask = None if i % 2 else np.full((2, 2), i, np.uint8)
        return {
            "image": np.full((3, 2, 2), i, np.float32),
            "mask": mask,
            "label": i % 2,
            "path": f"img{i}.png",
        }

    def release(self, count: int) -> None:
        with self.lock:
            self.released += count


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("BatchLoader")]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batch_loader_order_and_shapes(workers):
    indices = [5, 0, 9, 3, 7, 1, 2]
    loader = BatchLoader(
        CountingDataset(10, delay=0.001), batch_size=3, num_workers=workers, indices=indices
    )
    assert len(loader) == 3
    batches = list(loader)
    assert [b["paths"] for b in batches] == [
        ["img5.png", "img0.png", "img9.png"],
        ["img3.png", "img7.png", "img1.png"],
        ["img2.png"],
    ]
    first = batches[0]
    assert first["images"].dtype == np.float32 and first["images"].shape == (3, 3, 2, 2)
    assert first["images"][:, 0, 0, 0].tolist() == [5, 0, 9]
    assert first["labels"].dtype == np.int64 and first["labels"].tolist() == [1, 0, 1]
    assert first["masks"][0] is None and first["masks"][1].tolist() == [[0, 0], [0, 0]]
    assert batches[2]["images"].shape == (1, 3, 2, 2)
    assert [b["paths"] for b in BatchLoader(CountingDataset(4), 3, workers)] == [
        ["img0.png", "img1.png", "img2.png"],
        ["img3.png"],
    ]
    assert list(BatchLoader(CountingDataset(0), 3, workers)) == []
    assert not loader_threads()


def test_batch_loader_prefetch_is_bounded():
    dataset = CountingDataset(40, delay=0.001)
    for batch in BatchLoader(dataset, batch_size=4, num_workers=3):
        time.sleep(0.03)
        dataset.release(len(batch["paths"]))
    assert dataset.max_alive == 3 * 4
    assert dataset.started == 40


@pytest.mark.bad_input
def test_batch_loader_reraises_worker_error():
    dataset = CountingDataset(20, fail_at=6)
    seen = []
    with pytest.raises(InputError) as info:
        for batch in BatchLoader(dataset, batch_size=4, num_workers=2):
            seen += batch["paths"]
    assert info.value is dataset.error
    assert str(info.value) == "bad/item.png: cannot read image (broken); replace it"
    assert seen == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert not loader_threads()


def test_batch_loader_early_break_stops_threads():
    dataset = CountingDataset(100, delay=0.002)
    for _ in BatchLoader(dataset, batch_size=5, num_workers=2):
        break
    assert not loader_threads()
    started = dataset.started
    assert started <= 3 * 5
    time.sleep(0.05)
    assert dataset.started == started


def test_shard_indices_disjoint_covering_balanced():
    for n in range(0, 23):
        for world in range(1, 6):
            shards = [shard_indices(n, rank, world) for rank in range(world)]
            assert [i for shard in shards for i in shard] == list(range(n))
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1
    assert shard_indices(10, 1, 3) == [4, 5, 6]
    with pytest.raises(ValueError):
        shard_indices(10, 3, 3)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_layout(demo_root):
    assert resolve_categories(demo_root, "all") == ["disc", "tiles"]
    for category in ("tiles", "disc"):
        assert len(list_samples(demo_root, category, "train")) == 8
        test = list_samples(demo_root, category, "test")
        assert [s.defect for s in test] == ["good"] * 3 + ["scratch"] * 3 + ["spot"] * 3
        assert has_masks(test)
        item = AnomalyDataset(test, Preprocess(resize=64))[8]
        assert item["mask"].sum() > 0


def test_synthetic_masks_are_the_altered_pixels(demo_root):
    for category in ("tiles", "disc"):
        for folder in ("good", "scratch", "spot"):
            for index in range(3):
                clean, image = synthetic.render(category, folder, index, 64, 0)
                path = demo_root / category / "test" / folder / f"{index:03d}.png"
                assert (np.asarray(Image.open(path)) == image).all()
                assert 40 <= clean.min() and clean.max() <= 215
                altered = np.any(image != clean, axis=2)
                if folder == "good":
                    assert not altered.any()
                    continue
                mask_file = demo_root / category / "ground_truth" / folder / f"{index:03d}_mask.png"
                mask = np.asarray(Image.open(mask_file))
                assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
                assert ((mask > 0) == altered).all()
                assert 0.005 <= altered.mean() <= 0.05
                assert np.abs(image.astype(int) - clean)[altered].min() >= 40


def test_synthetic_deterministic_and_idempotent(tmp_path):
    args = {"categories": ("disc",), "n_train": 2, "n_test_good": 1, "n_test_defect": 1, "size": 32}
    first = synthetic.generate(tmp_path / "a", **args)
    second = synthetic.generate(tmp_path / "b", **args)
    assert first == tmp_path / "a"
    assert files_of(first) == files_of(second)
    other = files_of(synthetic.generate(tmp_path / "c", seed=1, **args))
    assert other.keys() == files_of(first).keys() and other != files_of(first)

    image = first / "disc" / "train" / "good" / "000.png"
    stamp = image.stat().st_mtime_ns
    time.sleep(0.01)
    assert synthetic.generate(first, **args) == first
    assert image.stat().st_mtime_ns == stamp

    synthetic.generate(first, **{**args, "n_train": 3})
    assert len(list((first / "disc" / "train" / "good").iterdir())) == 3
    assert '"n_train": 3' in (first / ".synthetic.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.bad_input
def test_synthetic_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="exists but is not a dataset written by this tool"):
        synthetic.generate(tmp_path / "mine", size=32)
    assert (tmp_path / "mine" / "keep.txt").exists()
    with pytest.raises(ConfigError) as info:
        synthetic.generate(tmp_path / "x", categories=("cube",))
    assert str(info.value).startswith("synthetic categories ['cube']: choose from")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_synthetic_cli(tmp_path, capsys):
    argv = ["--dst", str(tmp_path / "d"), "--size", "32", "--n_train", "1", "--categories", "tiles"]
    argv += ["--n_test_good", "1", "--n_test_defect", "1"]
    assert synthetic.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert synthetic.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


# --------------------------------------------------------------------------- magnetic tile


def make_magnetic_tile(src: Path) -> None:
    rng = np.random.default_rng(0)
    for i in (7, 3, 11, 0, 5, 1, 10, 2, 9, 4, 8, 6):
        save(
            rng.integers(0, 256, (6, 5), dtype=np.uint8), src / "MT_Free" / "Imgs" / f"f{i:02d}.jpg"
        )
        save(np.zeros((6, 5), np.uint8), src / "MT_Free" / "Imgs" / f"f{i:02d}.png")
    mask = np.zeros((6, 5), np.uint8)
    mask[1, 1], mask[2, 3], mask[4, 0] = 3, 200, 255
    for folder in magnetic_tile.DEFECT_FOLDERS:
        for name in ("b", "a"):
            save(
                rng.integers(0, 256, (6, 5), dtype=np.uint8), src / folder / "Imgs" / f"{name}.jpg"
            )
            save(mask, src / folder / "Imgs" / f"{name}.png")


def test_magnetic_tile_convert(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_magnetic_tile(src)
    counts = magnetic_tile.convert(src, dst)
    kinds = ("blowhole", "break", "crack", "fray", "uneven")
    expected = {"train/good": 10, "test/good": 2}
    expected |= {f"test/{k}": 2 for k in kinds} | {f"ground_truth/{k}": 2 for k in kinds}
    assert counts == expected
    out = dst / "magnetic_tile"
    assert sorted(p.name for p in (out / "test" / "good").iterdir()) == ["f04.jpg", "f09.jpg"]
    assert len(list((out / "train" / "good").iterdir())) == 10
    assert (out / "test" / "crack" / "a.jpg").read_bytes() == (
        src / "MT_Crack" / "Imgs" / "a.jpg"
    ).read_bytes()
    mask = np.asarray(Image.open(out / "ground_truth" / "crack" / "a_mask.png"))
    binary = np.zeros((6, 5), np.uint8)
    binary[1, 1] = binary[2, 3] = binary[4, 0] = 255
    assert mask.dtype == np.uint8 and (mask == binary).all()

    test = list_samples(dst, "magnetic_tile", "test")
    assert len(test) == 12 and has_masks(test)
    assert AnomalyDataset(test, Preprocess(resize=4))[2]["mask"].shape == (4, 4)

    stamp = (out / ".magnetic_tile.json").stat().st_mtime_ns
    (src / "MT_Crack" / "Imgs" / "a.png").unlink()
    assert magnetic_tile.convert(src, dst) == expected
    assert (out / ".magnetic_tile.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in dst.iterdir()) == ["magnetic_tile"]


@pytest.mark.bad_input
def test_magnetic_tile_errors(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with pytest.raises(InputError, match="magnetic-tile dataset folder not found"):
        magnetic_tile.convert(src, dst)
    make_magnetic_tile(src)
    (src / "MT_Crack" / "Imgs" / "b.png").unlink()
    with pytest.raises(InputError) as info:
        magnetic_tile.convert(src, dst)
    assert str(info.value).startswith(f"{src / 'MT_Crack' / 'Imgs' / 'b.jpg'}: its mask b.png")
    save(np.zeros((3, 3), np.uint8), src / "MT_Crack" / "Imgs" / "b.png")
    with pytest.raises(InputError, match="mask is 3x3 but image"):
        magnetic_tile.convert(src, dst)
    for path in (src / "MT_Fray" / "Imgs").iterdir():
        path.unlink()
    (src / "MT_Fray" / "Imgs").rmdir()
    with pytest.raises(InputError, match="MT_Fray/Imgs: folder not found"):
        magnetic_tile.convert(src, dst)
    assert not dst.exists() or not any(dst.iterdir())
    assert magnetic_tile.main(["--src", str(src), "--dst", str(dst)]) == 2
