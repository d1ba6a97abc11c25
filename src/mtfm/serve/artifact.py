"""Deployable scenario artifacts: ``mtfm export`` writes them, :class:`ExportedScenario` runs them.

An artifact is a directory holding one scenario's :class:`~mtfm.serve.export.RequestGraph`:

* ``program.pt2``: the :class:`torch.export.ExportedProgram` (``torch.export.load`` it; its
  ``.module()`` runs in any Python with torch, without this library's model code);
* ``aoti.pt2`` (``--aoti``): the program compiled ahead of time by AOTInductor into a shared
  library (``torch._inductor.aoti_load_package``; loadable from C++ too);
* ``model.onnx`` (``--onnx``, the ``export`` extra): the program converted to ONNX;
* ``request.json``: the graph's inputs (names and dtypes), the scenario's schema and tasks,
  where the weights came from, and the parity with eager PyTorch measured when it was written;
* ``data_manifest.json``: the prepared data's manifest, so :meth:`ExportedScenario.score_rows`
  builds requests from raw rows with the training feature code
  (:func:`mtfm.data.aggregate.build_request`) without the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtfm.config import schema_from_dict
from mtfm.data.batch import JaggedBatch
from mtfm.model.mtfm import MTFMBase
from mtfm.serve.export import (
    MIN_CANDIDATES,
    MIN_CONTEXT,
    RequestInputs,
    example_request,
    export_program,
    pad_request,
    request_inputs,
)

if TYPE_CHECKING:
    import polars as pl

    from mtfm.data.store import Manifest

ARTIFACT_FORMAT = 1
PROGRAM_FILE, AOTI_FILE, ONNX_FILE = "program.pt2", "aoti.pt2", "model.onnx"
SPEC_FILE, MANIFEST_FILE = "request.json", "data_manifest.json"
RUNTIMES = ("program", "aoti", "onnx")
RUNTIME_FILES = {"program": PROGRAM_FILE, "aoti": AOTI_FILE, "onnx": ONNX_FILE}


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_artifact(out: Path, model: MTFMBase, manifest_json: dict[str, Any] | None, source: dict[str, Any], *,
                   aoti: bool = False, onnx: bool = False) -> dict[str, Any]:
    """Write the artifact of ``model`` (a scenario subgraph, float32, eval) into the empty ``out``;
    return ``request.json``'s content. ``source``: where the weights came from (run, checkpoint);
    ``manifest_json``: the prepared data's manifest for the scenario (None: requests can then only
    be given as batches, :meth:`ExportedScenario.logits`)."""
    spec = RequestInputs(model.schema)
    example = example_request(spec)
    t0 = time.perf_counter()
    program = export_program(model, example)
    info: dict[str, Any] = {"export_seconds": round(time.perf_counter() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out / PROGRAM_FILE)
    files = [PROGRAM_FILE]
    if aoti:
        from torch._inductor import aoti_compile_and_package

        t0 = time.perf_counter()
        aoti_compile_and_package(program, package_path=str(out / AOTI_FILE))
        info["aoti_compile_seconds"] = round(time.perf_counter() - t0, 2)
        files.append(AOTI_FILE)
    if onnx:
        t0 = time.perf_counter()
        export_onnx(program, example, out / ONNX_FILE)
        info["onnx_export_seconds"] = round(time.perf_counter() - t0, 2)
        files.append(ONNX_FILE)
    if manifest_json is not None:
        (out / MANIFEST_FILE).write_text(json.dumps(manifest_json, indent=1))
        files.append(MANIFEST_FILE)
    meta = {
        "format": ARTIFACT_FORMAT,
        "scenario": spec.scenario,
        "tasks": spec.schema.scenario(spec.scenario).task_names,
        "inputs": spec.keys(),
        "schema": spec.schema.model_dump(mode="json", exclude_none=True),
        "outputs": "logits [num_candidates, num_tasks] float32, candidates in request order (T:<scenario>/@time's)",
        "min_candidates": MIN_CANDIDATES,  # smaller requests are padded on the host, exactly (pad_request)
        "min_context": MIN_CONTEXT,
        "files": files,
        "parameters": sum(p.numel() for p in program.state_dict.values()),
        "torch": torch.__version__,
        "source": source,
        **info,
    }
    (out / SPEC_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
    return meta


def export_onnx(program: torch.export.ExportedProgram, example: dict[str, Tensor], path: Path) -> None:
    """The exported program as ONNX (opset 18, dynamic lengths). Needs ``onnx`` and ``onnxscript``
    (the ``export`` extra); the error says so when they are missing."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install 'mtfm[export]'") from None
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, optimize=True, verbose=False)
    onnx_program.save(str(path))


# ---- loading and running an artifact --------------------------------------------------------------


@dataclass
class ExportedScenario:
    """A loaded artifact: scores requests without the run, through the chosen runtime."""

    path: Path
    meta: dict[str, Any]
    spec: RequestInputs
    runtime: str
    run: Callable[[dict[str, Tensor]], Tensor]

    @classmethod
    def load(cls, path: str | Path, runtime: str = "program") -> "ExportedScenario":
        """Load ``path`` (a directory ``mtfm export`` wrote) for ``runtime`` (program | aoti | onnx)."""
        path = Path(path)
        meta_path = path / SPEC_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found (is {path} an `mtfm export` output?)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{meta_path}: artifact format {meta.get('format')!r}, this version reads {ARTIFACT_FORMAT}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        file = RUNTIME_FILES[runtime]
        if file not in meta["files"]:
            raise FileNotFoundError(f"{path}: no {file} (export it with --{runtime})")
        spec = RequestInputs(schema_from_dict(meta["schema"], f"{meta_path}: schema"))
        if spec.keys() != meta["inputs"]:
            raise ValueError(f"{meta_path}: its inputs disagree with its schema")
        return cls(path, meta, spec, runtime, _runner(path / file, runtime, list(meta["inputs"])))

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    def logits(self, batch: JaggedBatch) -> Tensor:
        """Logits ``[N, tasks]`` of a one-user request of this scenario (checked on the host first)."""
        inputs = request_inputs(self.spec, batch)  # the checks, on the request as given (errors name its rows)
        if self.runtime == "onnx":
            empty = [name for name, seq in batch.history.items() if seq.num_rows == 0 and seq.features.multi]
            if empty:
                raise ValueError(f"the ONNX graph cannot score a request whose history type(s) {empty} (list-valued "
                                 "features) are empty: ONNX Runtime refuses an empty list of bags; use the program "
                                 "or aoti runtime")
        n = batch.scenarios[self.spec.scenario].num_rows
        if n == 0:
            return torch.zeros((0, len(self.tasks)))
        padded = pad_request(batch, self.spec)
        return self.run(inputs if padded is batch else request_inputs(self.spec, padded))[:n]

    def score_rows(self, tables: Mapping[str, "pl.DataFrame"], user: int, candidates: "pl.DataFrame",
                   request_time: int) -> dict[str, list[float]]:
        """Probabilities per task of ``candidates`` (the scenario's exposure rows, in request
        order) for ``user`` at ``request_time``, with the user's behaviour rows ``tables``: the
        request is built by the training feature code with the artifact's data manifest."""
        from mtfm.data.aggregate import build_request

        batch = build_request(tables, self.manifest(), user, self.spec.scenario, candidates, request_time)
        probs = torch.sigmoid(self.logits(batch).double())
        rows = batch.scenarios[self.spec.scenario].source_row
        ordered = torch.empty_like(probs).index_copy_(0, rows, probs) if rows is not None else probs
        return {task: ordered[:, k].tolist() for k, task in enumerate(self.tasks)}

    def manifest(self) -> "Manifest":
        """The prepared data's manifest the artifact was written with (encodings for build_request)."""
        from mtfm.data.store import Manifest

        if MANIFEST_FILE not in self.meta["files"]:
            raise FileNotFoundError(f"{self.path}: written without the data's manifest; give requests as batches")
        return Manifest.model_validate_json((self.path / MANIFEST_FILE).read_text())


def _runner(file: Path, runtime: str, names: list[str]) -> Callable[[dict[str, Tensor]], Tensor]:
    if runtime == "program":
        module = torch.export.load(str(file)).module()
        return lambda inputs: _no_grad(module, inputs)
    if runtime == "aoti":
        from torch._inductor import aoti_load_package

        compiled = aoti_load_package(str(file))
        return lambda inputs: _no_grad(compiled, inputs)
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("the onnx runtime needs onnxruntime: pip install 'mtfm[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in session.get_inputs()]
    if len(graph_inputs) != len(names):
        raise ValueError(f"{file}: {len(graph_inputs)} graph inputs, request.json lists {len(names)}")

    def run(inputs: dict[str, Tensor]) -> Tensor:
        feed = {g: inputs[n].numpy() for g, n in zip(graph_inputs, names)}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def _no_grad(fn: Callable[[dict[str, Tensor]], Tensor], inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return fn(inputs)


def one_user_requests(batch: JaggedBatch, scenario: str) -> Iterator[JaggedBatch]:
    """Each user of a batch with exposures of ``scenario`` as a request of that scenario alone."""
    from mtfm.model.batch_ops import restrict_batch, select_users

    counts = (batch.scenarios[scenario].offsets[1:] - batch.scenarios[scenario].offsets[:-1]).tolist()
    only = restrict_batch(batch, [scenario])
    for user, n in enumerate(counts):
        if n:
            yield select_users(only, [user])


def parity(model: MTFMBase, artifact: ExportedScenario, requests: list[JaggedBatch]) -> dict[str, float]:
    """Largest absolute logit difference between eager ``model(batch)`` and the artifact, over requests."""
    worst, rows = 0.0, 0
    for batch in requests:
        with torch.no_grad():
            eager = model(batch).logits[artifact.spec.scenario].float()
        got = artifact.logits(batch).float()
        worst = max(worst, float((eager - got).abs().max()) if got.numel() else 0.0)
        rows += got.shape[0]
    return {"requests": len(requests), "candidates": rows, "max_abs_logit_diff": worst}


PARITY_TOLERANCE = 1e-4  # fp32 logits; the graph regroups sums (the request backend), nothing else differs


def export_run(run_dir: str | Path, scenario: str, out: str | Path, *, data_dir: str | Path | None = None,
               checkpoint: str = "best", runtimes: tuple[str, ...] = ("program",), parity_requests: int = 64,
               overwrite: bool = False, allow_other_data: bool = False) -> dict[str, Any]:
    """Write the artifact of ``scenario`` of a trained run into ``out`` and check it against eager
    PyTorch on up to ``parity_requests`` users' requests of the data's test split (each user's
    test exposures of the scenario as one request). Returns ``request.json``'s content; raises
    if a runtime's logits differ from eager by more than :data:`PARITY_TOLERANCE`."""
    from mtfm.data.store import read_manifest
    from mtfm.dirlock import claim_output_dir, hold_dir_lock
    from mtfm.model.mtfm import MTFM
    from mtfm.serve.scoring import run_data_dir
    from mtfm.train.evaluate import checkpoint_loader, scenario_checkpoints
    from mtfm.train.models import model_from_checkpoint
    from mtfm.train.rundata import check_checkpoint_data

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or "program" not in runtimes:
        raise ValueError(f"runtimes must include 'program' and be among {RUNTIMES}, got {list(runtimes)}")
    chosen = scenario_checkpoints(run_dir, checkpoint)
    if scenario not in chosen:
        raise ValueError(f"--scenario: {scenario!r} is not a scenario of {run_dir}; it has {sorted(chosen)}")
    ckpt = chosen[scenario]
    data_dir = Path(data_dir) if data_dir is not None else run_data_dir(run_dir)
    check_checkpoint_data(ckpt, data_dir, action="export", allow_other_data=allow_other_data)
    model, _, schema = model_from_checkpoint(ckpt)
    if not isinstance(model, MTFM):
        raise ValueError(f"{ckpt}: holds a {type(model).__name__}; `mtfm export` exports MTFM runs")
    model = model.float().eval()
    sub = model.scenario_subgraph(scenario)
    manifest = read_manifest(data_dir)
    restricted = schema.restrict([scenario])
    manifest_json = manifest.model_copy(update={
        "data_schema": restricted.model_dump(mode="json", exclude_none=True), "scenarios_prepared": [scenario],
    }).model_dump(mode="json")
    loader = checkpoint_loader(ckpt, data_dir, "test", [scenario], batch_size=64)
    requests: list[JaggedBatch] = []
    for batch in loader.iterate(0):
        requests += list(one_user_requests(batch, scenario))
        if len(requests) >= parity_requests:
            break
    requests = requests[:parity_requests]
    out = Path(out)
    with hold_dir_lock(out, "mtfm export"):
        claim_output_dir(out, overwrite, SPEC_FILE, "mtfm export")
        source = {"run": str(Path(run_dir).resolve()), "checkpoint": str(ckpt), "data": str(Path(data_dir).resolve()),
                  "model_parameters": sum(p.numel() for p in model.parameters())}
        meta = write_artifact(out, sub, manifest_json, source, aoti="aoti" in runtimes, onnx="onnx" in runtimes)
        checks = {}
        for runtime in runtimes:
            checks[runtime] = parity(sub, ExportedScenario.load(out, runtime), requests)
        meta["parity"] = {"tolerance": PARITY_TOLERANCE, "split": "test", **checks}
        (out / SPEC_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
    bad = {r: c["max_abs_logit_diff"] for r, c in checks.items() if not c["max_abs_logit_diff"] <= PARITY_TOLERANCE}
    if bad:
        raise RuntimeError(f"{out}: the exported graph disagrees with eager PyTorch beyond {PARITY_TOLERANCE}: {bad} "
                           "(a bug in mtfm export; the artifact is left for inspection)")
    return meta


__all__ = ["ExportedScenario", "PARITY_TOLERANCE", "RUNTIMES", "export_run", "one_user_requests", "parity",
           "write_artifact"]
