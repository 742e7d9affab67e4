"""Feature extractors: the FID Inception-v3 (random weights in the published layout)
and the domain classifier seen through the same contract."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.metrics import features as feat
from aigc.metrics.classifier import _cache_path, train_classifier
from aigc.metrics.features import (
    INCEPTION_SHA256,
    INCEPTION_URL,
    FIDInceptionV3,
    classifier_extractor,
    fid_preprocess,
    inception_extractor,
    inception_weights_path,
    inception_weights_to_safetensors,
    load_fid_inception,
)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Seeded random weights in the FID Inception layout, scaled so activations stay O(1)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pth_file(random_state, tmp_path_factory):
    """The weights as the release file stores them: torch.save of a state dict."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_state, path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Five non-square uint8 RGB images, (5, 3, 40, 30)."""
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 40, 30), np.uint8))


def _without_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# --- the network and its weights file -----------------------------------------


def test_key_layout_is_pytorch_fids():
    """Names and shapes of pytorch-fid's fid_inception_v3() (torchvision's Inception3 with
    num_classes=1008, aux_logits=False and the FIDInception blocks)."""
    state = FIDInceptionV3().state_dict()
    known = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch3x3dbl_3.bn.weight": (96,),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for k, shape in known.items():
        assert tuple(state[k].shape) == shape, k
    # torchvision's Inception-v3 has 27,161,264 parameters; without AuxLogits (3,326,696)
    # and with 1008 instead of 1000 classes (+16,392) that is 23,850,960
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 23_850_960
    assert sum(k.endswith(".conv.weight") for k in state) == 94
    assert len(_without_counters(state)) == 94 * 5 + 2
    assert not any(k.startswith("AuxLogits") for k in state)


def test_pth_and_safetensors_load_and_agree(random_state, pth_file, images, tmp_path):
    ext = inception_extractor(pth_file, verify=False)
    assert ext.name == f"inception-v3-fid:{_sha256(pth_file)[:8]}"
    f, logits = ext.features_and_logits(images[:2])
    assert f.shape == (2, 2048) and logits.shape == (2, 1008)
    assert f.dtype == np.float64 and np.isfinite(f).all() and np.isfinite(logits).all()
    assert (f >= 0).all() and f.std() > 0  # averages of ReLU outputs
    # the loaded weights are the file's, and logits are pool3 @ W^T without the bias
    w = random_state["fc.weight"].double().numpy()
    np.testing.assert_allclose(logits, f @ w.T, rtol=1e-4, atol=1e-5)
    assert torch.equal(
        ext.network.Mixed_7c.branch_pool.conv.weight.cpu(),
        random_state["Mixed_7c.branch_pool.conv.weight"],
    )

    # the same keys as safetensors (here without BatchNorm's step counters) give the same
    st = tmp_path / "random-inception.safetensors"
    save_file(_without_counters(random_state), str(st))
    ext_st = inception_extractor(st, verify=False)
    assert ext_st.name == f"inception-v3-fid:{_sha256(st)[:8]}"
    f_st, logits_st = ext_st.features_and_logits(images[:2])
    np.testing.assert_array_equal(f_st, f)
    np.testing.assert_array_equal(logits_st, logits)
    assert ext.features(images[:0]).shape == (0, 2048)


def test_features_do_not_depend_on_batch_size(pth_file, images):
    ext = inception_extractor(pth_file, verify=False)
    f5, l5 = ext.features_and_logits(images, batch_size=5)
    f2, l2 = ext.features_and_logits(images.numpy(), batch_size=2)  # arrays work too
    np.testing.assert_allclose(f2, f5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l2, l5, rtol=1e-5, atol=1e-5)
    # against the network fed an independently resized first image
    x = torch.from_numpy(_reference_preprocess(images[:1].numpy())).float()
    with torch.inference_mode():
        f_ref = ext.network.pool3(x).double().numpy()
    np.testing.assert_allclose(f5[:1], f_ref, rtol=1e-4, atol=1e-5)


# --- preprocessing -----------------------------------------------------------------


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of bilinear resizing with half-pixel centres (PyTorch's
    align_corners=False, the pytorch-fid protocol; TensorFlow 1 has no half-pixel
    centres, see _tf1_1d): source = (dest + 0.5) * n_in / n_out - 0.5."""
    m = np.zeros((n_out, n_in))
    for d in range(n_out):
        s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[d, i0] += 1.0 - (s - i0)
        m[d, i1] += s - i0
    return m


def _reference_preprocess(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, 3, 299, 299) float64 in [-1, 1], in NumPy."""
    x = images.astype(np.float64) / 255.0
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    rows, cols = _bilinear_1d(x.shape[2], 299), _bilinear_1d(x.shape[3], 299)
    x = np.einsum("yh,nchw,xw->ncyx", rows, x, cols)
    return 2.0 * x - 1.0


def test_preprocess_matches_an_independent_resize():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 3, 37, 53), np.uint8)
    grey = rng.integers(0, 256, (1, 1, 301, 20), np.uint8)  # one side shrinks
    for img in (rgb, grey):
        out = fid_preprocess(torch.from_numpy(img))
        assert out.shape == (len(img), 3, 299, 299) and out.dtype == torch.float32
        # PyTorch computes source coordinates in float32 (off by up to ~1e-5 pixel at 300
        # pixels); align_corners=True would differ by ~1, antialiasing by ~1e-2
        np.testing.assert_allclose(out.numpy(), _reference_preprocess(img), atol=1e-4)
        # the same images in the models' range [-1, 1] give the same input
        as_float = torch.from_numpy(img).float() / 127.5 - 1.0
        np.testing.assert_allclose(fid_preprocess(as_float).numpy(), out.numpy(), atol=2e-6)
    # at 299×299 nothing is resampled; float values outside [-1, 1] are clamped
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    torch.testing.assert_close(fid_preprocess(x), x, atol=1e-6, rtol=0)
    # (to float32 rounding: PyTorch's one-thread bilinear kernel gives 1 + 2.4e-7)
    assert abs(fid_preprocess(torch.full((1, 3, 8, 8), 3.0)).max().item() - 1.0) < 1e-6
    with pytest.raises(DataError, match="to_tensor"):
        fid_preprocess(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))  # (N, H, W, C)
    with pytest.raises(DataError, match="uint8"):
        fid_preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


# --- refusing wrong files ----------------------------------------------------------


def test_a_wrong_file_is_refused_by_its_sha256(pth_file, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_fid_inception(pth_file)  # verify=True is the default
    msg = str(e.value)
    assert str(pth_file) in msg and INCEPTION_SHA256 in msg and _sha256(pth_file) in msg
    assert INCEPTION_URL in msg and "AIGC_INCEPTION_WEIGHTS" in msg
    # a file that is no weights at all is refused by its hash before it is read
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match=INCEPTION_SHA256):
        inception_extractor(junk)
    with pytest.raises(CheckpointError, match=r"not a (readable )?PyTorch"):
        inception_extractor(junk, verify=False)


def test_a_missing_file_or_no_path_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(CheckpointError, match="not found") as e:
        inception_extractor(missing, verify=False)
    assert str(missing) in str(e.value) and INCEPTION_URL in str(e.value)
    monkeypatch.delenv("AIGC_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match="--inception-weights"):
        inception_weights_path(None)
    monkeypatch.setenv("AIGC_INCEPTION_WEIGHTS", str(missing))
    assert inception_weights_path(None) == missing
    assert inception_weights_path(tmp_path / "given.pth") == tmp_path / "given.pth"


class _Payload:
    """Unpickling this object would call open(marker, "w"): a stand-in for code a
    malicious weights file could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_objects_is_refused_unexecuted(random_state, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({**random_state, "extra": _Payload(str(marker))}, evil)
    for verify in (True, False):  # refused by its hash, or by weights_only
        with pytest.raises(CheckpointError) as e:
            load_fid_inception(evil, verify=verify)
        assert str(evil) in str(e.value)
    assert "was not unpickled (Unsupported global" in str(e.value)
    assert not marker.exists()


def test_keys_must_match_exactly(random_state, tmp_path):
    def refused(state: dict[str, torch.Tensor]) -> str:
        path = tmp_path / "edited.safetensors"
        save_file(state, str(path))
        with pytest.raises(CheckpointError) as e:
            load_fid_inception(path, verify=False)
        return str(e.value)

    state = _without_counters(random_state)
    msg = refused({k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.bn.bias"})
    assert "missing: Mixed_6c.branch7x7_2.bn.bias" in msg
    msg = refused({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)})
    assert "unexpected: AuxLogits.fc.weight" in msg
    msg = refused({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    assert "wrong shape: fc.weight (1000, 2048) (expected (1008, 2048))" in msg


def test_safetensors_copy_keeps_the_identity_of_its_pth(
    random_state, pth_file, tmp_path, monkeypatch
):
    sha = _sha256(pth_file)
    st = inception_weights_to_safetensors(pth_file, tmp_path / "copy.safetensors", verify=False)
    model, ident = load_fid_inception(st, verify=False)
    assert ident == sha
    assert torch.equal(model.fc.weight, random_state["fc.weight"])
    # pretend the random file is the published one: the .pth and its copy now verify
    monkeypatch.setattr(feat, "INCEPTION_SHA256", sha)
    assert load_fid_inception(pth_file)[1] == sha
    assert inception_extractor(st).name == f"inception-v3-fid:{sha[:8]}"
    # edited tensors under the copied metadata lose the identity and are refused
    state = load_file(str(st))
    state["fc.bias"] = state["fc.bias"] + 1.0
    edited = tmp_path / "edited.safetensors"
    save_file(state, str(edited), metadata={"source_sha256": sha, "tensors_sha256": "0" * 64})
    assert load_fid_inception(edited, verify=False)[1] == _sha256(edited)
    with pytest.raises(CheckpointError, match="not the published"):
        load_fid_inception(edited)


# --- the domain classifier -------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (36, 8, 8, 3), np.uint8)
    labels = {"shape": rng.integers(0, 3, 36), "colour": rng.integers(0, 2, 36)}
    classes = {"shape": ["a", "b", "c"], "colour": ["red", "blue"]}
    clf = train_classifier(imgs, labels, classes, key="test|random-8x8", epochs=1)
    return clf, imgs


def test_classifier_extractor(classifier):
    clf, imgs = classifier
    ext = classifier_extractor(clf)
    assert ext.name == f"domain-classifier:{_cache_path(clf.key).stem[:12]}"
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    f, logits = ext.features_and_logits(x, batch_size=36)
    assert f.shape == (36, clf.model.feature_dim) and logits.shape == (36, 3)
    # the model's own penultimate features and first head, on the range it was trained on
    x_model = x.float() / 127.5 - 1.0
    clf.model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(f, clf.model.features(x_model).double().numpy(), atol=1e-6)
        np.testing.assert_allclose(logits, clf.model(x_model)["shape"].double().numpy(), atol=1e-6)
    f7 = ext.features(x_model, batch_size=7)  # float input, other batches: the same
    np.testing.assert_allclose(f7, f, rtol=1e-5, atol=1e-6)
    # eval mode only while extracting; the model is left as it was
    for training in (True, False):
        clf.model.train(training)
        ext.features(x[:2])
        assert clf.model.training == training and clf.model.trunk[0][1].training == training
    assert ext.features(x[:0]).shape == (0, clf.model.feature_dim)
    with pytest.raises(DataError, match="3-channel"):
        ext.features(x[:, :1])


def test_classifiers_without_a_key_are_named_by_their_weights(classifier):
    clf, _ = classifier
    keyless = type(clf)(clf.model, clf.accuracy, clf.classes, key="")
    name = classifier_extractor(keyless).name
    assert name.startswith("domain-classifier:") and name != classifier_extractor(clf).name
    assert name == classifier_extractor(keyless, device="cpu").name


# --- the tf protocol: TensorFlow 1's resize and scaling, against torch-fidelity ----


def _tf1_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of TensorFlow 1's resize_bilinear (align_corners=False, no
    half-pixel centres): source = dest * n_in / n_out, in float32 as TF computes it."""
    m = np.zeros((n_out, n_in))
    scale = np.float32(n_in) / np.float32(n_out)
    for d in range(n_out):
        s = np.float32(d) * scale
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[d, i0] += 1.0 - float(s - np.floor(s))
        m[d, i1] += float(s - np.floor(s))
    return m


@pytest.fixture
def torch_fidelity(monkeypatch):
    """torch-fidelity's Inception module and TF1 resize, imported without the package's
    __init__ (which imports torchvision, which has no CPU wheel beside our torch), and
    with torch.load held to weights_only=True."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (make test installs it)")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    for name in [m for m in sys.modules if m.startswith("torch_fidelity")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    inception = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    resize = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: load(f, **{**kw, "weights_only": True}))
    yield types.SimpleNamespace(inception=inception, resize=resize)
    for name in [m for m in sys.modules if m.startswith("torch_fidelity.")]:
        del sys.modules[name]


def test_tf_protocol_preprocess_matches_tensorflow1_and_torch_fidelity(torch_fidelity):
    rng = np.random.default_rng(2)
    for shape in [(2, 3, 32, 32), (1, 3, 37, 53), (1, 3, 301, 20), (1, 1, 28, 28)]:
        img = rng.integers(0, 256, shape, np.uint8)
        ours = fid_preprocess(torch.from_numpy(img), "tf")
        assert ours.shape == (shape[0], 3, 299, 299) and ours.dtype == torch.float32
        # an independent NumPy computation of TF1's resize, then (x - 128) / 128
        x = np.repeat(img, 3, axis=1) if shape[1] == 1 else img
        rows, cols = _tf1_1d(shape[2], 299), _tf1_1d(shape[3], 299)
        ref = (np.einsum("yh,nchw,xw->ncyx", rows, x.astype(np.float64), cols) - 128) / 128
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)
        # torch-fidelity's own resize and scaling
        theirs = torch_fidelity.resize.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x).float(), size=(299, 299), align_corners=False
        )
        np.testing.assert_allclose(ours.numpy(), ((theirs - 128) / 128).numpy(), atol=1e-5)
        # the two protocols really differ (half-pixel centres, and 2u/255 - 1 vs (u - 128)/128)
        assert (fid_preprocess(torch.from_numpy(img)) - ours).abs().max() > 0.1
    # float images in the models' range map to the same values as their uint8 originals
    img = torch.from_numpy(rng.integers(0, 256, (1, 3, 16, 16), np.uint8))
    as_float = img.float() / 127.5 - 1.0
    torch.testing.assert_close(
        fid_preprocess(as_float, "tf"), fid_preprocess(img, "tf"), atol=1e-5, rtol=0
    )
    with pytest.raises(ConfigError, match="pytorch-fid, tf"):
        fid_preprocess(img, "tensorflow")


def test_tf_protocol_features_equal_torch_fidelitys(torch_fidelity, pth_file):
    """End to end from uint8 images, random weights shared by both: pool3 features and
    unbiased logits equal to 1e-5 of their scale."""
    imgs = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 3, 32, 32), np.uint8))
    theirs_net = torch_fidelity.inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=pth_file
    )
    with torch.inference_mode():
        f_ref, l_ref = (t.double().numpy() for t in theirs_net(imgs))
    tf = inception_extractor(pth_file, verify=False, protocol="tf")
    f, logits = tf.features_and_logits(imgs)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    assert rel(f, f_ref) <= 1e-5 and rel(logits, l_ref) <= 1e-5
    # the default protocol is pytorch-fid's, measurably different at 32 px
    f_pt = inception_extractor(pth_file, verify=False).features(imgs)
    assert rel(f_pt, f_ref) > 1e-3


def test_protocol_names_the_extractor_and_is_checked(pth_file):
    default = inception_extractor(pth_file, verify=False)
    tf = inception_extractor(pth_file, verify=False, protocol="tf")
    sha8 = _sha256(pth_file)[:8]
    # the pytorch-fid name is unchanged, so statistics cached before protocols existed
    # are read as pytorch-fid's; tf's name differs, so its cache key differs
    assert default.name == f"inception-v3-fid:{sha8}" and default.fid_protocol == "pytorch-fid"
    assert tf.name == f"inception-v3-fid:{sha8}+tf" and tf.fid_protocol == "tf"
    with pytest.raises(ConfigError, match="protocol"):
        inception_extractor(pth_file, verify=False, protocol="pt")


def test_pytorch_fid_protocol_features_equal_pytorch_fids(random_state, images, monkeypatch):
    """pytorch-fid 0.3.0's own extractor, random weights shared by both, fed [0, 1]
    floats as its data loader gives them. Its module imports torchvision, which has no
    CPU wheel beside our torch: this runs where a user has both."""
    pytest.importorskip("torchvision")
    pfid = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: dict(random_state))
    theirs = pfid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    with torch.inference_mode():
        f_ref = theirs(images.float() / 255.0)[0].flatten(1).double().numpy()
    ours = FIDInceptionV3()
    ours.load_state_dict(random_state)
    ext = feat.FeatureExtractor("x", ours, 2048, 1008, torch.device("cpu"), "pytorch-fid")
    f = ext.features(images)
    assert np.abs(f - f_ref).max() <= 1e-5 * np.abs(f_ref).max()
