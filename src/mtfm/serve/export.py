"""One scenario's request scoring as a graph ``torch.export`` can capture (paper 3.1, 3.3.3).

At inference each scenario runs only its own subgraph
(:meth:`mtfm.model.mtfm.MTFM.scenario_subgraph`: the scenario's tokenizer, GLN groups and heads,
plus the shared sequence tokenizers, attention and experts; no other scenario's weights).
:class:`RequestGraph` is that subgraph's :meth:`~mtfm.model.mtfm.MTFMBase.forward_request`
behind a boundary of plain tensors (:class:`RequestInputs`: one flat 1-D tensor per feature and
per layout field, named ``{field}/{feature}``): one request (one user, N candidates, the
context tokens first), every size taken from an input's shape, no host sync, on the
``request`` attention backend (:mod:`mtfm.kernels.request`). :func:`export_program` captures
it with every length symbolic; :mod:`mtfm.serve.artifact` writes, loads and checks the result.

What a traced graph cannot do runs on the host before every call: the value checks
(:func:`request_inputs`: ids within their tables, finite numbers, the token order; out of
range ids are refused, not clamped) and the padding of tiny requests to the lengths the graph
was traced for (:func:`pad_request`, exact).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtfm.config import DataSchema, MultiCategoricalFeature, NumericFeature
from mtfm.data.batch import (
    NEVER,
    FeatureTensors,
    JaggedBatch,
    ScenarioBatch,
    SequenceBatch,
    TokenLayout,
    build_token_layout,
)
from mtfm.kernels.request import check_request_order
from mtfm.model.embedding import check_feature_values
from mtfm.model.mtfm import MTFMBase, check_token_layout, embedding_fields

# The exported graph holds for any lengths but tiny ones: a matmul of 1 row (or 0) takes another
# path than one of N rows, so torch.export guards "!= 1" and "!= 0" on the candidates and on the
# context. The host pads a request to these minimums without changing a score (pad_request).
MIN_CANDIDATES = 2
MIN_CONTEXT = 2
_PARTS = ("user", "cross", "item")
_LAYOUT = {"group": "group_ids", "type": "token_type", "time": "timestamps", "row": "source_row", "expiry": "expiry"}


class RequestInputs:
    """The flat tensors of one request of one scenario: how a :class:`JaggedBatch` crosses the
    boundary of an exported graph (a dict of 1-D tensors whose names say what they are).

    Per sequence type (``H:<name>``, ``R:<name>``) and per scenario part (``T:<scenario>:user``,
    ``...:cross``, ``...:item``): ``{field}/{feature}`` (ids or normalised values, one per row),
    or ``{field}/{feature}/values`` and ``/offsets`` for a list-valued feature. Rows:
    ``{H|R}:<name>/@time`` and ``T:<scenario>/@time`` (the candidates, in request order).
    The token layout: ``layout/@group`` (the model's group index), ``@type``, ``@time``,
    ``@row`` and ``@expiry``.
    """

    def __init__(self, schema: DataSchema) -> None:
        if len(schema.scenarios) != 1:
            raise ValueError(f"a request graph scores one scenario; the schema has {schema.scenario_names}")
        self.schema = schema
        self.scenario = schema.scenario_names[0]
        self.fields = embedding_fields(schema)
        self.groups = schema.token_groups()

    # ---- names -------------------------------------------------------------------------------

    def keys(self) -> dict[str, str]:
        """Input name -> dtype (``int64`` or ``float32``), in the graph's argument order."""
        out: dict[str, str] = {}
        for kind, specs in (("H", self.schema.history), ("R", self.schema.realtime)):
            for spec in specs:
                out[f"{kind}:{spec.name}/@time"] = "int64"
                out.update(self._feature_keys(f"{kind}:{spec.name}"))
        out[f"T:{self.scenario}/@time"] = "int64"
        for part in _PARTS:
            field = f"T:{self.scenario}:{part}"
            if field in self.fields:
                out.update(self._feature_keys(field))
        out.update({f"layout/@{k}": "int64" for k in _LAYOUT})
        return out

    def _feature_keys(self, field: str) -> dict[str, str]:
        keys: dict[str, str] = {}
        for feat in self.fields.get(field, []):
            if isinstance(feat, MultiCategoricalFeature):
                keys[f"{field}/{feat.name}/values"] = keys[f"{field}/{feat.name}/offsets"] = "int64"
            else:
                keys[f"{field}/{feat.name}"] = "float32" if isinstance(feat, NumericFeature) else "int64"
        return keys

    # ---- batch <-> tensors ----------------------------------------------------------------------

    def flatten(self, batch: JaggedBatch, group_ids: Tensor) -> dict[str, Tensor]:
        """The request's tensors (``group_ids``: the layout's groups in the model's order)."""
        out: dict[str, Tensor] = {}
        for kind, seqs in (("H", batch.history), ("R", batch.realtime)):
            for name, seq in seqs.items():
                out[f"{kind}:{name}/@time"] = seq.timestamps
                self._put_features(out, f"{kind}:{name}", seq.features)
        sb = batch.scenarios[self.scenario]
        out[f"T:{self.scenario}/@time"] = sb.timestamps
        for part in _PARTS:
            self._put_features(out, f"T:{self.scenario}:{part}", getattr(sb, part))
        lay = batch.layout
        values = {"group": group_ids, "type": lay.token_type, "time": lay.timestamps, "row": lay.source_row,
                  "expiry": lay.expiry if lay.expiry is not None else torch.full_like(lay.timestamps, NEVER)}
        out.update({f"layout/@{k}": v for k, v in values.items()})
        return {k: out[k].to(torch.float32 if dtype == "float32" else torch.int64).contiguous()
                for k, dtype in self.keys().items()}

    def _put_features(self, out: dict[str, Tensor], field: str, features: FeatureTensors) -> None:
        for feat in self.fields.get(field, []):
            if isinstance(feat, MultiCategoricalFeature):
                values, offsets = features.multi[feat.name]
                out[f"{field}/{feat.name}/values"], out[f"{field}/{feat.name}/offsets"] = values, offsets
            elif isinstance(feat, NumericFeature):
                out[f"{field}/{feat.name}"] = features.numeric[feat.name]
            else:
                out[f"{field}/{feat.name}"] = features.categorical[feat.name]

    def unflatten(self, inputs: dict[str, Tensor]) -> JaggedBatch:
        """The one-user batch the tensors stand for (its group ids already in the model's order)."""
        def features(field: str) -> FeatureTensors:
            ft = FeatureTensors()
            for feat in self.fields.get(field, []):
                if isinstance(feat, MultiCategoricalFeature):
                    ft.multi[feat.name] = (inputs[f"{field}/{feat.name}/values"], inputs[f"{field}/{feat.name}/offsets"])
                elif isinstance(feat, NumericFeature):
                    ft.numeric[feat.name] = inputs[f"{field}/{feat.name}"]
                else:
                    ft.categorical[feat.name] = inputs[f"{field}/{feat.name}"]
            return ft

        def seq(kind: str, name: str) -> SequenceBatch:
            t = inputs[f"{kind}:{name}/@time"]
            return SequenceBatch(_one_user_offsets(t), t, features(f"{kind}:{name}"))

        s = self.scenario
        t = inputs[f"T:{s}/@time"]
        empty = t.new_zeros((t.shape[0], 0), dtype=torch.float32)
        scenario = ScenarioBatch(_one_user_offsets(t), t, *(features(f"T:{s}:{p}") for p in _PARTS),
                                 labels=empty, label_mask=empty.bool(), oracle=empty)
        lay = {name: inputs[f"layout/@{k}"] for k, name in _LAYOUT.items()}
        layout = TokenLayout(offsets=_one_user_offsets(lay["token_type"]), **lay)
        one = torch.zeros(1, dtype=torch.long, device=t.device)
        return JaggedBatch(one, one, {x.name: seq("H", x.name) for x in self.schema.history},
                           {x.name: seq("R", x.name) for x in self.schema.realtime}, {s: scenario}, layout)


def _one_user_offsets(rows: Tensor) -> Tensor:
    """``[0, n]`` for the ``n`` rows of ``rows`` (from its shape: no host sync)."""
    zero = torch.zeros((), dtype=torch.long, device=rows.device)
    return torch.stack([zero, zero + rows.shape[0]])


def request_inputs(spec: RequestInputs, batch: JaggedBatch) -> dict[str, Tensor]:
    """Check a one-user request on the host and turn it into the graph's tensors.

    The checks a traced graph cannot raise: one user, the spec's scenario (others are dropped
    by name only if absent: a batch holding another scenario is refused), every sequence type
    of the model present, a consistent layout with the context tokens first, ids within their
    tables and finite numbers. Each error names the field, feature and row.
    """
    if batch.batch_size != 1:
        raise ValueError(f"a request is one user; the batch holds {batch.batch_size}")
    if list(batch.scenarios) != [spec.scenario]:
        raise ValueError(f"this graph scores scenario {spec.scenario!r}; the request holds {list(batch.scenarios)}")
    want = {"history": [s.name for s in spec.schema.history], "realtime": [s.name for s in spec.schema.realtime]}
    for kind, names in want.items():
        have = list(getattr(batch, kind))
        if sorted(have) != sorted(names):
            raise ValueError(f"the request's {kind} types {have} are not the model's {names}")
    batch_groups = ([f"H:{n}" for n in batch.history] + [f"R:{n}" for n in batch.realtime]
                    + [f"T:{n}" for n in batch.scenarios])
    check_token_layout(batch, batch_groups)
    num_context = sum(s.num_rows for s in batch.history.values()) + sum(s.num_rows for s in batch.realtime.values())
    check_request_order(batch.layout.token_type, num_context)
    sources = [(f"H:{n}", s.features, s.num_rows) for n, s in batch.history.items()]
    sources += [(f"R:{n}", s.features, s.num_rows) for n, s in batch.realtime.items()]
    sb = batch.scenarios[spec.scenario]
    sources += [(f"T:{spec.scenario}:{p}", getattr(sb, p), sb.num_rows) for p in _PARTS]
    for field, features, rows in sources:
        for feat in spec.fields.get(field, []):
            check_feature_values(field, feat, features, rows)
    remap = torch.tensor([spec.groups.index(g) for g in batch_groups], dtype=torch.long)
    return spec.flatten(batch, remap[batch.layout.group_ids])


def pad_request(batch: JaggedBatch, spec: RequestInputs) -> JaggedBatch:
    """The request with at least :data:`MIN_CANDIDATES` candidates, :data:`MIN_CONTEXT` context
    tokens and one row of every real-time type, scoring its own candidates exactly as before
    (``tests/test_export.py``).

    * Candidates: the last one is repeated. No token attends to another T-token (the mask), so a
      copy changes no score; its row comes after the real ones and is dropped.
    * Context: invisible real-time actions are added (ids 0, values 0, empty lists, at the
      earliest time in the request, with an expiry before their own time). The rule
      ``t_k < t_q <= expiry_k`` hides them from every query and position gaps count visible keys
      only, so no other token's output moves. An empty real-time type gets one (ONNX Runtime
      refuses an empty list of bags); a short context gets them in the first real-time type. A
      schema without real-time types cannot be padded that way: a request of fewer than
      :data:`MIN_CONTEXT` actions is refused, naming the minimum.
    """
    from mtfm.model.batch_ops import take_candidates

    sb = batch.scenarios[spec.scenario]
    if 0 < sb.num_rows < MIN_CANDIDATES:
        rows = torch.cat([torch.arange(sb.num_rows), torch.full((MIN_CANDIDATES - sb.num_rows,), sb.num_rows - 1)])
        batch = take_candidates(batch, spec.scenario, rows)
    start = int(batch.layout.timestamps.min()) - 1 if batch.layout.timestamps.numel() else 0
    realtime = dict(batch.realtime)
    for name, seq in realtime.items():
        if seq.num_rows == 0:
            realtime[name] = _with_ghost_rows(seq, spec.fields.get(f"R:{name}", []), 1, start)
    context = sum(s.num_rows for s in batch.history.values()) + sum(s.num_rows for s in realtime.values())
    if context < MIN_CONTEXT:
        if not realtime:
            raise ValueError(f"this exported graph needs at least {MIN_CONTEXT} history / real-time actions per "
                             f"request and the request has {context}; the schema has no real-time type to pad it with")
        name = next(iter(realtime))
        realtime[name] = _with_ghost_rows(realtime[name], spec.fields.get(f"R:{name}", []), MIN_CONTEXT - context, start)
    if all(realtime[n] is batch.realtime[n] for n in realtime):
        return batch
    layout = build_token_layout(batch.history, realtime, batch.scenarios, 1)
    return JaggedBatch(batch.user_ids, batch.window_start, batch.history, realtime, batch.scenarios, layout)


def _with_ghost_rows(seq: SequenceBatch, features: list, ghosts: int, time: int) -> SequenceBatch:
    """``seq`` with ``ghosts`` rows first: time ``time``, expiry ``time - 1`` (seen by no query),
    every id 0, every number 0, every list empty."""
    ft = seq.features
    new = FeatureTensors()
    for feat in features:
        if isinstance(feat, MultiCategoricalFeature):
            values, offsets = ft.multi[feat.name]
            new.multi[feat.name] = (values, torch.cat([offsets.new_zeros(ghosts), offsets]))
        elif isinstance(feat, NumericFeature):
            new.numeric[feat.name] = torch.cat([ft.numeric[feat.name].new_zeros(ghosts), ft.numeric[feat.name]])
        else:
            new.categorical[feat.name] = torch.cat([ft.categorical[feat.name].new_zeros(ghosts), ft.categorical[feat.name]])
    n = seq.num_rows + ghosts
    expiry = seq.expiry if seq.expiry is not None else torch.full_like(seq.timestamps, NEVER, dtype=torch.long)
    return SequenceBatch(torch.tensor([0, n]), torch.cat([torch.full((ghosts,), time), seq.timestamps.long()]), new,
                         torch.cat([torch.full((ghosts,), time - 1), expiry.long()]))


class RequestGraph(nn.Module):
    """What is exported: request tensors (:class:`RequestInputs`) -> logits ``[N, num_tasks]``
    of the candidates in their request order (:meth:`MTFMBase.forward_request`)."""

    def __init__(self, model: MTFMBase) -> None:
        super().__init__()
        self.model = model
        self.spec = RequestInputs(model.schema)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.model.forward_request(self.spec.unflatten(inputs))


def example_request(spec: RequestInputs, seed: int = 0) -> dict[str, Tensor]:
    """Random request tensors with at least 2 rows, values and tokens everywhere (the trace's
    example: a dimension of size 0 or 1 would be specialised, not kept symbolic)."""
    from mtfm.model.testing import BatchShape, random_batch

    lengths = {s.name: [4] for s in (*spec.schema.history, *spec.schema.realtime)}
    lengths[spec.scenario] = [3]
    for attempt in range(100):
        batch = random_batch(spec.schema, 1, seed=seed + attempt, shape=BatchShape(history=4, realtime=4, exposures=3),
                             lengths=lengths)
        inputs = request_inputs(spec, batch)
        if all(t.shape[0] >= 2 for t in inputs.values()):
            return inputs
    raise RuntimeError("could not draw an example request with every dimension >= 2")


def export_program(model: MTFMBase, example: dict[str, Tensor] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of one scenario's :class:`RequestGraph`, every input's length symbolic."""
    graph = RequestGraph(model).eval()
    example = example if example is not None else example_request(graph.spec)
    dims = {k: {0: torch.export.Dim.DYNAMIC} for k in example}
    # backed_size_oblivious: reason about every length as ">= 0", not from the example's values, so a
    # request with one candidate or no real-time action is not outside the program's range
    from torch.fx.experimental import _config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(graph, (example,), dynamic_shapes=(dims,), strict=False)


__all__ = [
    "MIN_CANDIDATES",
    "MIN_CONTEXT",
    "RequestGraph",
    "RequestInputs",
    "example_request",
    "export_program",
    "pad_request",
    "request_inputs",
]
