"""ONNX export of an image model: encoder.onnx (x -> mu, logvar) and decoder.onnx
(z -> likelihood parameters, mean image), both with a dynamic batch dimension, plus io.json.

The graphs come from torch.onnx.export's torch.export-based exporter (dynamo=True): the
TorchScript exporter is deprecated since torch 2.9 and warns that it will be removed, and
the new one traces these small encoders and decoders to the same outputs (measured within
5e-7 of PyTorch). Encoder and decoder are traced together and split with onnx.utils (see
Pair). Before anything is written, each graph is run with onnxruntime on a batch of a size
other than the traced one and compared with the PyTorch model; a graph that differs is
refused, so a folder never holds an export that was not checked.

Sequence (text) models are refused: their decoder is a loop over positions with a greedy or
sampled choice per step, which needs a step-wise decoder graph not written yet.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_cli.errors import UserError, one_line
from vae_cli.export.weights import Exported, describe, write_json
from vae_cli.objective.model import VAE
from vae_cli.runtime.files import atomic_write

ONNX_EXTRA = "pip install 'vae-cli[onnx]'"
TRACE_BATCH, CHECK_BATCH = 2, 3  # different sizes: the check also proves the batch is dynamic
TOLERANCE = 1e-4  # max |onnx - torch|, relative to the outputs' scale when above 1
MAX_PROTO = 2**31 - 1  # protobuf's limit on one serialised graph
MEANS = {  # what `params` is, per likelihood, and how `mean` follows from it
    "Bernoulli": "logits of p(x = 1) per sub-pixel; mean = sigmoid(params)",
    "Gaussian": "the mean of N(x | params, sigma^2) (sigma = exp(likelihood.log_scale) in "
                "the weights); mean = clip(params, 0, 1)",
    "Laplace": "the location of Laplace(x | params, b) (b = exp(likelihood.log_scale) in the "
               "weights); mean = clip(params, 0, 1)",
    "Categorical": "logits over K levels per channel, channel c's at c*K .. c*K+K-1; "
                   "mean = sum_k softmax(logits)_k * k / (K - 1)",
    "DiscretizedLogistic": "C channels of location then C of log-scale of a discretized "
                           "logistic on [-1, 1]; mean = clip((location + 1) / 2, 0, 1)",
}


class ExportMismatch(UserError):
    """The exporter produced a graph whose outputs differ from the model's: a bug, not bad
    input, hence exit code 1; nothing is written."""

    exit_code = 1


class EncoderGraph(nn.Module):
    """x -> (mu, logvar) of q(z|x) = N(mu, exp(logvar)), as VAE.posterior computes them."""

    def __init__(self, model: VAE):
        super().__init__()
        self.encoder, self.bounds = model.encoder, model.family.bounds

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).float().chunk(2, dim=-1)
        return mu, logvar.clamp(*self.bounds)


class DecoderGraph(nn.Module):
    """z -> (likelihood parameters, the mean image in [0, 1] that vae's pictures show)."""

    def __init__(self, model: VAE):
        super().__init__()
        self.decoder, self.likelihood = model.decoder, model.likelihood

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.decoder(z)
        return params.float(), self.likelihood.mean(params)


def require_onnx() -> None:
    """onnx (the graph), onnxscript (the exporter's translation) and onnxruntime (the check)."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"format=onnx needs {', '.join(missing)}: {ONNX_EXTRA}")
    if torch.__version__ < "2.6":  # TorchVersion compares as a version, not as text
        raise UserError(f"format=onnx needs torch>=2.6 (its torch.export-based exporter), "
                        f"this is {torch.__version__}; use format=safetensors")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's notes (its optimizer's passes at INFO, onnxscript version warnings)
    are not the user's concern: warnings and INFO records are held back while it runs."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


class Pair(nn.Module):
    """Encoder and decoder side by side, traced in one export: the exporter spends a second
    or two building its operator table on every call, so one call, then a split, halves
    the time of `vae export` (and of its tests)."""

    def __init__(self, model: VAE):
        super().__init__()
        self.encoder, self.decoder = EncoderGraph(model), DecoderGraph(model)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*self.encoder(x), *self.decoder(z))


GRAPHS = {"encoder": (["x"], ["mu", "logvar"]), "decoder": (["z"], ["params", "mean"])}


def to_onnx(model: VAE, x: torch.Tensor, z: torch.Tensor) -> tuple[dict[str, bytes], int]:
    """encoder.onnx and decoder.onnx as bytes, the batch dimension (dim 0 of every input and
    output) dynamic and named "batch"; and the ONNX operator set they use."""
    batch = {"x": torch.export.Dim("batch", min=1), "z": torch.export.Dim("batch_z", min=1)}
    with quiet():
        program = torch.onnx.export(
            Pair(model).eval(), (x, z), dynamo=True, verbose=False, input_names=["x", "z"],
            output_names=[n for _, outputs in GRAPHS.values() for n in outputs],
            dynamic_shapes=({0: batch["x"]}, {0: batch["z"]}))
    proto = program.model_proto
    if proto.ByteSize() > MAX_PROTO:
        raise UserError("the model is over 2 GB, more than one ONNX file holds; "
                        "use format=safetensors")
    import onnx.utils

    extractor = onnx.utils.Extractor(proto)
    graphs = {}
    for name, (inputs, outputs) in GRAPHS.items():
        part = extractor.extract_model(inputs, outputs)  # only what these outputs need
        g = part.graph
        for value in (*g.input, *g.output, *g.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "batch_z":
                    dim.dim_param = "batch"
        graphs[name] = part.SerializeToString()
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return graphs, opset


def check(graph: nn.Module, onnx: bytes, inputs: torch.Tensor, what: str) -> float:
    """Runs the graph with onnxruntime and PyTorch on the same inputs: the max |difference|."""
    import onnxruntime

    try:
        runtime = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        got = runtime.run(None, {runtime.get_inputs()[0].name: inputs.numpy()})
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ExportMismatch(f"onnxruntime cannot run {what}.onnx on a batch of "
                             f"{len(inputs)} ({one_line(e)}); nothing written") from None
    with torch.no_grad():
        want = list(graph(inputs))
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        same_shape = tuple(g.shape) == tuple(w.shape)
        diff = float((torch.from_numpy(g) - w).abs().max()) if same_shape else float("inf")
        if not diff <= TOLERANCE * max(1.0, float(w.abs().max())):  # NaN fails too
            raise ExportMismatch(f"{what}.onnx differs from the PyTorch model (max |diff| "
                                 f"{diff:.3g}, shapes {tuple(g.shape)} and {tuple(w.shape)}); "
                                 "nothing written")
        worst = max(worst, diff)
    return worst


def _tensor(name: str, shape: tuple[int, ...], meaning: str) -> dict[str, Any]:
    return {"name": name, "shape": ["batch", *shape], "dtype": "float32", "meaning": meaning}


def io_spec(src: Exported, params: torch.Tensor, mean: torch.Tensor) -> dict[str, Any]:
    """io.json's description of the two graphs; shapes read from real outputs."""
    d, likelihood = src.model.latent_dim, type(src.model.likelihood).__name__
    prior = src.components.get("prior", "?")
    return {
        "encoder": {"file": "encoder.onnx", "inputs": [_tensor(
            "x", tuple(src.shape), "examples with values in [0, 1]")], "outputs": [
            _tensor("mu", (d,), "mean of q(z|x)"),
            _tensor("logvar", (d,), "log-variance of q(z|x), clamped to "
                    f"{list(src.model.family.bounds)}"
                    "; std = exp(logvar / 2), z = mu + std * eps")]},
        "decoder": {"file": "decoder.onnx", "inputs": [_tensor(
            "z", (d,), "latent codes: encoder means, or samples of the prior")], "outputs": [
            _tensor("params", tuple(params.shape[1:]), f"{likelihood} parameters of p(x|z): "
                    + MEANS.get(likelihood, "see vae_cli.objective.likelihoods")),
            _tensor("mean", tuple(mean.shape[1:]), "the image p(x|z) is centred on, in "
                    "[0, 1]: what vae's reconstructions and samples show")]},
        "prior": {"name": prior, "sampling": "z = randn(batch, latent_dim)" if prior ==
                  "normal" else "a learned prior: its parameters are in format=safetensors "
                  "(model.prior.sample(n)); these graphs do not hold it"},
    }


def write_onnx(src: Exported, out_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """encoder.onnx, decoder.onnx and io.json, each checked before any is written; returns
    ({file name: what it holds}, {graph: max |onnx - torch| seen by the check})."""
    if src.sequence:
        raise UserError("format=onnx does not support sequence models yet; use "
                        "format=safetensors")
    if src.model.conditional:  # the graphs would need the one-hot class as a second input
        raise UserError("format=onnx does not support conditional models yet; use "
                        "format=safetensors")
    if not src.model.family.closed_form:  # the encoder graph gives a Gaussian's mu, logvar
        raise UserError(f"format=onnx exports Gaussian posteriors only; posterior="
                        f"{src.model.family.option} is not a Gaussian "
                        "the graph gives as mu and logvar: use format=safetensors")
    # Traced and checked on the CPU whatever device loaded it: the check runs onnxruntime's
    # CPU provider, and CUDA's TF32 convolutions alone would differ by more than TOLERANCE.
    model = src.model.cpu()
    g = torch.Generator().manual_seed(0)
    x = {n: torch.rand(n, *src.shape, generator=g) for n in (TRACE_BATCH, CHECK_BATCH)}
    z = {n: torch.randn(n, model.latent_dim, generator=g) for n in x}
    graphs, opset = to_onnx(model, x[TRACE_BATCH], z[TRACE_BATCH])
    encoder, decoder = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    diffs = {"encoder": check(encoder, graphs["encoder"], x[CHECK_BATCH], "encoder"),
             "decoder": check(decoder, graphs["decoder"], z[CHECK_BATCH], "decoder")}
    for name, data in graphs.items():
        with atomic_write(out_dir / f"{name}.onnx") as f:
            f.write(data)
    with torch.no_grad():
        params, mean = decoder(z[CHECK_BATCH])
    write_json(out_dir / "io.json", {
        **io_spec(src, params, mean), "opset": opset,
        "check": {"runtime": "onnxruntime", "batch": CHECK_BATCH, "max_abs_diff": diffs},
        **describe(src)})
    return ({"encoder.onnx": "x -> mu, logvar: the encoder q(z|x)",
             "decoder.onnx": "z -> params, mean: the decoder p(x|z)",
             "io.json": "input and output names, shapes, dtypes and meanings; the config"},
            diffs)

