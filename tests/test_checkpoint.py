"""Model files: round trips, weight hashes, every refusal, and a malicious pickle that must not run."""

import builtins
import collections
import dataclasses
import io
import os
import pickle
import re

import pytest
import torch

from restoration.checkpoint import (
    LoadedModel,
    ModelFileError,
    load_model,
    model_to_bytes,
    save_model,
    weights_sha256,
)
from restoration.models.restorer import Restorer, RestorerConfig

CONFIG = RestorerConfig(arch="dncnn", channels=1, depth=4, width=8)


class TouchOnUnpickle:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code that leaves visible evidence."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def trained_like(config: RestorerConfig = CONFIG) -> Restorer:
    """A model whose BN statistics and weights are not at their init values."""
    model = Restorer(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def valid_payload(model: Restorer | None = None) -> dict:
    """The plain dict inside a valid model file, for tests that corrupt one part of it."""
    data = model_to_bytes("restorer", CONFIG, model or trained_like(), meta={"preset": "tiny"})
    return torch.load(io.BytesIO(data), weights_only=True)


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# Round trips.


@pytest.mark.parametrize(
    "config", [CONFIG, RestorerConfig(arch="fast", channels=3, depth=3, width=4, batch_norm=False)]
)
def test_save_load_round_trip_gives_identical_outputs_and_hash(tmp_path, config):
    model = trained_like(config)
    meta = {"preset": "restorer-dncnn-cpu", "metrics": {"psnr": 29.1, "ssim": 0.83}, "epochs": [1, 2]}
    path = tmp_path / "model.pt"
    sha = save_model(path, "restorer", config, model, meta=meta)

    loaded = load_model(path, expected_kind="restorer")
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "restorer"
    assert loaded.config == config
    assert loaded.meta == meta
    assert loaded.sha256 == sha == weights_sha256(model.state_dict())
    assert not loaded.module.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.module.parameters())
    x = torch.rand(2, config.channels, 21, 18)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    assert not list(tmp_path.glob(".*tmp")), "the temporary file of the atomic write was left behind"


def test_bytes_stream_and_file_handle_sources_load_the_same_model(tmp_path):
    model = trained_like()
    data = model_to_bytes("restorer", CONFIG, model)
    path = tmp_path / "m.pt"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        from_handle = load_model(handle)
    from_bytes = load_model(data)
    from_stream = load_model(io.BytesIO(data))
    from_str_path = load_model(str(path))
    assert from_handle.sha256 == from_bytes.sha256 == from_stream.sha256 == from_str_path.sha256
    assert from_bytes.meta == {}
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(from_handle.module(x), from_bytes.module(x))


def test_a_folded_model_saves_with_its_own_config_and_loads_back():
    model = trained_like()
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        expected = model(x)
    model.fold_batch_norm()
    loaded = load_model(model_to_bytes("restorer", model.config, model))
    assert loaded.config.batch_norm is False
    with torch.no_grad():
        assert (loaded.module(x) - expected).abs().max() < 1e-5


def test_the_file_holds_only_plain_data():
    payload = valid_payload()
    assert set(payload) == {"format", "format_version", "kind", "config", "state_dict", "meta"}
    assert payload["format"] == "restoration-model" and payload["format_version"] == 1
    assert payload["config"] == dataclasses.asdict(CONFIG)
    assert all(type(v) is torch.Tensor for v in payload["state_dict"].values())


# Weight hashes.


def test_sha256_changes_when_one_weight_changes_by_one_ulp():
    model = trained_like()
    before = weights_sha256(model.state_dict())
    with torch.no_grad():
        w = model.body[1].conv.weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(float("inf")))
    assert weights_sha256(model.state_dict()) != before


def test_sha256_ignores_dict_order_and_container_but_not_dtype():
    model = trained_like()
    state = model.state_dict()
    reordered = collections.OrderedDict(reversed(list(state.items())))
    sha = weights_sha256(state)
    assert weights_sha256(reordered) == sha
    assert load_model(model_to_bytes("restorer", CONFIG, model)).sha256 == sha
    # Saved again after loading: the same weights give the same digest although the file bytes are new.
    reloaded = load_model(
        model_to_bytes("restorer", CONFIG, load_model(model_to_bytes("restorer", CONFIG, model)).module)
    )
    assert reloaded.sha256 == sha
    assert weights_sha256({k: v.double() for k, v in state.items()}) != sha
    assert len(sha) == 64 and int(sha, 16) >= 0


def test_sha256_rejects_non_tensors():
    with pytest.raises(TypeError, match="state_dict\\['a'\\] is a list"):
        weights_sha256({"a": [1.0]})


# Refusals when saving.


def test_save_refuses_unknown_kind_wrong_config_and_mismatched_module(tmp_path):
    model = trained_like()
    with pytest.raises(ValueError, match="unknown model kind 'unet': expected one of restorer"):
        save_model(tmp_path / "a.pt", "unet", CONFIG, model)
    with pytest.raises(TypeError, match="must be a RestorerConfig, got dict"):
        save_model(tmp_path / "a.pt", "restorer", dataclasses.asdict(CONFIG), model)
    with pytest.raises(ValueError, match="meta must be JSON-serialisable|JSON-serialisable"):
        save_model(tmp_path / "a.pt", "restorer", CONFIG, model, meta={"when": object()})
    # Folded BN with the unfolded config would write a file that could never load: refused up front.
    model.fold_batch_norm()
    with pytest.raises(ValueError, match="missing 'body.1.bn.weight'"):
        save_model(tmp_path / "a.pt", "restorer", CONFIG, model)
    assert not list(tmp_path.iterdir())


# Refusals when loading: the file itself.


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelFileError, match=f"^model file not found: {re.escape(str(path))}$"):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"", b"just some text\n", to_bytes([torch.zeros(2)])],
    ids=["random", "empty", "text", "list-of-tensors"],
)
def test_files_that_are_not_model_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=f"^{re.escape(str(path))} is not a valid model file: ") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_directory_and_remote_uri_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="is not a valid model file: it is a directory"):
        load_model(tmp_path)
    with pytest.raises(ModelFileError, match="only local paths"):
        load_model("s3://bucket/model.pt")


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, container):
    def payload(marker) -> bytes:
        obj = {"format": "restoration-model", "meta": TouchOnUnpickle(marker)}
        return to_bytes(obj) if container == "torch.save" else pickle.dumps(obj, protocol=2)

    # Control: an ordinary unpickler really runs the payload, so the check below can fail.
    control = tmp_path / "control-marker"
    if container == "torch.save":
        torch.load(io.BytesIO(payload(control)), weights_only=False)
    else:
        pickle.loads(payload(control))
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(payload(marker))
    with pytest.raises(
        ModelFileError, match=f"^{re.escape(str(path))} is not a valid model file: refused by the weights-only"
    ) as err:
        load_model(path)
    assert "open" in str(err.value)
    with pytest.raises(ModelFileError, match="^<bytes> is not a valid model file"):
        load_model(payload(marker))
    assert not marker.exists()


# Refusals when loading: the contents.


def test_missing_keys_wrong_format_and_newer_version():
    payload = valid_payload()
    without = {k: v for k, v in payload.items() if k not in ("state_dict", "meta")}
    with pytest.raises(ModelFileError, match="not a valid model file: missing key\\(s\\) 'state_dict', 'meta'$"):
        load_model(to_bytes(without))
    with pytest.raises(ModelFileError, match="format is 'other', expected 'restoration-model'"):
        load_model(to_bytes({**payload, "format": "other"}))
    with pytest.raises(ModelFileError, match="format_version 2 is newer"):
        load_model(to_bytes({**payload, "format_version": 2}))
    with pytest.raises(ModelFileError, match="meta is a list, expected a dict"):
        load_model(to_bytes({**payload, "meta": []}))


def test_unknown_kind_and_wrong_kind():
    payload = valid_payload()
    # A file of another family, written as plain data (a kind that no entry of MODELS will ever have).
    other = to_bytes({**payload, "kind": "diffusion", "config": {"steps": 1000}})
    with pytest.raises(ModelFileError, match="^<bytes>: unknown model kind 'diffusion': expected one of restorer"):
        load_model(other)
    with pytest.raises(ModelFileError, match="^<bytes> holds a diffusion model, expected a restorer$"):
        load_model(other, expected_kind="restorer")
    with pytest.raises(ValueError, match="expected_kind='gan'"):
        load_model(model_to_bytes("restorer", CONFIG, trained_like()), expected_kind="gan")


def test_a_vae_file_from_before_sampling_priors_loads_with_the_normal_prior():
    from restoration.models.vae import VAE, VAEConfig

    model = VAE(VAEConfig(latent_dim=4, width=4))
    payload = torch.load(io.BytesIO(model_to_bytes("vae", model.config, model)), weights_only=True)
    del payload["config"]["prior_components"]  # as files written before the field existed
    loaded = load_model(to_bytes(payload), expected_kind="vae")
    assert loaded.config.prior_components == 0 and loaded.config == model.config


def test_config_fields_that_do_not_match_the_dataclass():
    payload = valid_payload()
    extra = {**payload, "config": {**payload["config"], "dropout": 0.1}}
    with pytest.raises(ModelFileError, match="config does not match RestorerConfig: unexpected field\\(s\\) 'dropout'"):
        load_model(to_bytes(extra))
    missing = {**payload, "config": {k: v for k, v in payload["config"].items() if k != "width"}}
    with pytest.raises(ModelFileError, match="missing field\\(s\\) 'width'"):
        load_model(to_bytes(missing))
    invalid = {**payload, "config": {**payload["config"], "channels": 2}}
    with pytest.raises(ModelFileError, match="invalid RestorerConfig: RestorerConfig.channels=2"):
        load_model(to_bytes(invalid))


def test_state_dict_that_does_not_match_the_config():
    payload = valid_payload()
    state = payload["state_dict"]

    missing = {k: v for k, v in state.items() if not k.startswith("body.1.")}
    with pytest.raises(ModelFileError, match="weights do not match the restorer config: missing 'body.1.conv.weight'"):
        load_model(to_bytes({**payload, "state_dict": missing}))

    extra = {**state, "head.weight": torch.zeros(3)}
    with pytest.raises(ModelFileError, match="unexpected 'head.weight'"):
        load_model(to_bytes({**payload, "state_dict": extra}))

    reshaped = {**state, "body.0.conv.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(
        ModelFileError, match=r"shape mismatch: body.0.conv.weight is \(8, 3, 3, 3\), expected \(8, 1, 3, 3\)"
    ):
        load_model(to_bytes({**payload, "state_dict": reshaped}))

    # A config that disagrees with the weights (wider net) names the first few mismatches, not all of them.
    wider = {**payload, "config": {**payload["config"], "width": 16}}
    with pytest.raises(ModelFileError, match=r"shape mismatch: .*\(\+\d+ more\)"):
        load_model(to_bytes(wider))

    not_tensor = {**state, "body.0.conv.bias": [0.0] * 8}
    with pytest.raises(ModelFileError, match="state_dict entry 'body.0.conv.bias' is a list"):
        load_model(to_bytes({**payload, "state_dict": not_tensor}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_saved_on_gpu_loads_on_cpu(tmp_path):
    model = trained_like().to("cuda")
    sha = save_model(tmp_path / "gpu.pt", "restorer", CONFIG, model)
    # A file whose tensors were pickled as CUDA storages (written by other code) loads too, thanks to map_location.
    payload = valid_payload()
    cuda_file = to_bytes({**payload, "state_dict": {k: v.cuda() for k, v in payload["state_dict"].items()}})
    for source in (tmp_path / "gpu.pt", cuda_file):
        loaded = load_model(source)
        assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    assert load_model(tmp_path / "gpu.pt").sha256 == sha == weights_sha256(model.state_dict())
