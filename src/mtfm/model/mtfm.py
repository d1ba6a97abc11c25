"""The MTFM model: heterogeneous tokens -> HTA stack -> MMoE heads (paper section 3.2).

``MTFM(schema, config)(batch)`` maps a :class:`~mtfm.data.batch.JaggedBatch` to logits per
scenario and task. Everything the model builds comes from the schema:

* one tokenizer MLP per history type and per real-time type (eq. 3) over its features'
  embeddings, and one per scenario over ``Emb(U^s) || Emb(C^s) || Emb(I^s)`` (eq. 4);
* the tokens are placed in the batch's ``TokenLayout`` order ``(H; R; T)`` per user (eq. 5);
* Group LayerNorm groups are the schema's :meth:`~mtfm.config.DataSchema.token_groups`;
* one MMoE gate and tower per (scenario, task).

Batches may hold any subset of the model's sequence types and scenarios (a scenario may also
have zero rows): tokens are matched to the model's groups *by name*, not by position. A batch
holding a scenario or sequence type the model does not know is an error (it would otherwise be
silently ignored); :func:`mtfm.model.batch_ops.restrict_batch` drops scenarios explicitly.

:meth:`MTFM.scenario_subgraph` returns the inference path of one scenario (paper 3.1): it
holds only that scenario's tokenizer, GLN parameters and heads (plus the shared sequence
tokenizers, attention weights and experts) and gives the same logits as the full model,
because no token ever attends to a T-token of another scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtfm.config import DataSchema
from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T, JaggedBatch
from mtfm.kernels import AttentionLayout, forced_backend
from mtfm.kernels.request import request_layout
from mtfm.model.config import ModelConfig
from mtfm.model.content import batch_content, in_layout_order, link_tables, link_widths
from mtfm.model.embedding import FeatureEmbeddings, check_columns, describe_field
from mtfm.model.heads import MMoE
from mtfm.model.hta import HTAStack, TokenGroups
from mtfm.model.init import similarity_init
from mtfm.model.layers import MLP, GroupLayerNorm
from mtfm.model.loss import masked_bce_loss, masked_bce_terms

_PARTS = ("user", "cross", "item")


def _scenario_fields(scenario: str, fields: dict[str, list]) -> list[str]:
    """The embedding fields a scenario's tokenizer reads, in concatenation order (parts without features left out)."""
    return [f for f in (f"T:{scenario}:{p}" for p in _PARTS) if f in fields]


@dataclass
class ModelOutput:
    """What one forward pass returns.

    ``logits[s]``: float ``[n_s, num_tasks_s]``, rows aligned with ``batch.scenarios[s]`` and
    columns in the schema's task order. ``target_embeddings[s]``: ``[n_s, d_model]``, the final
    T-token embeddings the MMoE reads (after the final Group LayerNorm when it is on), same rows.
    """

    logits: dict[str, Tensor]
    target_embeddings: dict[str, Tensor]


def embedding_fields(schema: DataSchema) -> dict[str, list]:
    """Embedding fields of a schema (scenario parts without features are left out)."""
    fields: dict[str, list] = {}
    for s in schema.history:
        fields[f"H:{s.name}"] = list(s.features)
    for s in schema.realtime:
        fields[f"R:{s.name}"] = list(s.features)
    for sc in schema.scenarios:
        for part, features in sc.feature_groups.items():
            if features:
                fields[f"T:{sc.name}:{part}"] = list(features)
    return fields


class MTFMBase(nn.Module):
    """The forward pass shared by the full model and its scenario subgraphs."""

    def __init__(
        self,
        schema: DataSchema,
        config: ModelConfig,
        embeddings: FeatureEmbeddings,
        history_tokenizers: nn.ModuleDict,
        realtime_tokenizers: nn.ModuleDict,
        scenario_tokenizers: nn.ModuleDict,
        stack: HTAStack,
        final_norm: GroupLayerNorm | None,
        head: MMoE,
        content_links: list[str] | None = None,
    ) -> None:
        """``content_links``: the shared tables whose content vectors the attention matches
        (``config.content_match``, :mod:`mtfm.model.content`); empty or None: no content match."""
        super().__init__()
        self.schema, self.config = schema, config
        self.groups = schema.token_groups()
        self.target_groups = [f"T:{s}" for s in schema.scenario_names]
        self._group_index = {g: i for i, g in enumerate(self.groups)}
        self._num_context_groups = len(schema.history) + len(schema.realtime)
        self.embeddings = embeddings
        self.history_tokenizers = history_tokenizers
        self.realtime_tokenizers = realtime_tokenizers
        self.scenario_tokenizers = scenario_tokenizers
        self.stack = stack
        self.final_norm = final_norm
        self.head = head
        self.content_links = list(content_links or [])

    # ---- forward ---------------------------------------------------------------------------

    def attention_layout(self, batch: JaggedBatch) -> AttentionLayout:
        """The batch's attention metadata, with every token's content vector when the model matches content."""
        layout = AttentionLayout.from_token_layout(batch.layout)
        if self.content_links:
            layout.content = batch_content(self.embeddings, self.content_links, batch)
        return layout

    def forward(self, batch: JaggedBatch) -> ModelOutput:
        layout = self.attention_layout(batch)
        groups = self._token_groups(batch, layout)
        x = self._tokens(batch)
        x = self.stack(x, groups, layout)
        targets = layout.queries("target").index
        x_t = x.index_select(0, targets)
        if self.final_norm is not None:
            x_t = self.final_norm(x_t, groups.target)
        rows = batch.layout.source_row[targets]
        logits: dict[str, Tensor] = {}
        embeddings: dict[str, Tensor] = {}
        for name, scenario in batch.scenarios.items():
            local = self.target_groups.index(f"T:{name}")
            sel = torch.nonzero(groups.target == local).flatten()
            emb = x_t.new_zeros((scenario.num_rows, x_t.shape[1])).index_copy(0, rows[sel], x_t.index_select(0, sel))
            embeddings[name] = emb
            out = self.head(emb, name)
            logits[name] = out if out.dtype == torch.float64 else out.float()  # bf16 -> fp32; fp64 kept
        return ModelOutput(logits, embeddings)

    def forward_request(self, batch: JaggedBatch) -> Tensor:
        """Logits ``[L, num_tasks]`` of one request: one user, one scenario, the context tokens
        before the T-tokens (as :func:`mtfm.data.aggregate.build_request` lays them out); rows in
        the scenario's row order (``batch.scenarios[s]``), like :meth:`forward`'s.

        The same numbers as :meth:`forward` (``tests/test_export.py``), computed with the
        ``request`` attention backend (:mod:`mtfm.kernels.request`): every size comes from a
        tensor shape and nothing syncs with the host, so this is the graph that
        :mod:`mtfm.serve.export` hands to ``torch.export``. Its value checks run only eagerly.
        """
        if len(batch.scenarios) != 1 or batch.batch_size != 1:
            raise ValueError(f"a request is one user and one scenario; the batch holds {batch.batch_size} users "
                             f"and scenarios {list(batch.scenarios)}")
        (name, _), = batch.scenarios.items()
        num_context = sum(s.num_rows for s in batch.history.values()) + sum(s.num_rows for s in batch.realtime.values())
        lay = batch.layout
        layout = request_layout(lay.token_type, lay.timestamps, lay.expiry, num_context)
        if self.content_links:
            layout.content = batch_content(self.embeddings, self.content_links, batch)
        groups = self._token_groups(batch, layout)
        with forced_backend("request"):
            x = self.stack(self._tokens(batch), groups, layout)
        x_t = x[num_context:]
        if self.final_norm is not None:
            x_t = self.final_norm(x_t, groups.target)
        out = self.head(x_t, name)
        out = out if out.dtype == torch.float64 else out.float()
        return torch.zeros_like(out).index_copy(0, lay.source_row[num_context:], out)

    def _token_groups(self, batch: JaggedBatch, layout: AttentionLayout) -> TokenGroups:
        """Map the batch's positional group ids to the model's groups by name; check the layout."""
        batch_groups = (
            [f"H:{n}" for n in batch.history] + [f"R:{n}" for n in batch.realtime] + [f"T:{n}" for n in batch.scenarios]
        )
        unknown = [g for g in batch_groups if g not in self._group_index]
        if unknown:
            raise ValueError(
                f"the batch holds token groups {unknown} that this model does not know (its groups: {self.groups}); "
                "build the model from a schema that has them, or drop them with mtfm.model.batch_ops.restrict_batch"
            )
        if not torch.compiler.is_exporting():  # value checks: eager only (mtfm.serve.export checks on the host)
            check_token_layout(batch, batch_groups)
        device = batch.layout.group_ids.device
        remap = torch.tensor([self._group_index[g] for g in batch_groups], dtype=torch.long, device=device)
        all_ids = remap[batch.layout.group_ids] if batch_groups else batch.layout.group_ids
        target = all_ids[layout.queries("target").index] - self._num_context_groups
        return TokenGroups(all_ids, target)

    def _tokens(self, batch: JaggedBatch) -> Tensor:
        """``X^(0)`` (eq. 5): every token's tokenizer output, in the batch's layout order."""
        parts: list[Tensor] = []
        for name, seq in batch.history.items():
            parts.append(self.history_tokenizers[name](self.embeddings.embed(f"H:{name}", seq.features, seq.num_rows)))
        for name, seq in batch.realtime.items():
            parts.append(self.realtime_tokenizers[name](self.embeddings.embed(f"R:{name}", seq.features, seq.num_rows)))
        for name, scenario in batch.scenarios.items():
            embs = []
            for part in _PARTS:
                field = f"T:{name}:{part}"
                if field in self.embeddings.fields:
                    embs.append(self.embeddings.embed(field, getattr(scenario, part), scenario.num_rows))
                else:
                    check_columns(describe_field(field), [], getattr(scenario, part))
            parts.append(self.scenario_tokenizers[name](torch.cat(embs, dim=1)))
        return in_layout_order(parts, batch)

    # ---- loss ------------------------------------------------------------------------------

    def loss_terms(self, batch: JaggedBatch, out: ModelOutput) -> dict[str, Tensor]:
        """``"scenario/task"`` -> that task's term of :meth:`loss`; tasks without an observed label are absent."""
        return masked_bce_terms(self.schema, batch, out.logits, self.config.loss_weighting)

    def loss(self, batch: JaggedBatch, out: ModelOutput) -> Tensor:
        """Sum over (scenario, task) of the BCE over observed labels, normalised by
        ``config.loss_weighting`` (default ``exposure``: every labelled exposure weighs the same,
        whatever its scenario); see :mod:`mtfm.model.loss`."""
        return masked_bce_loss(self.schema, batch, out.logits, self.config.loss_weighting)


def check_token_layout(batch: JaggedBatch, batch_groups: list[str]) -> None:
    """The layout must place every row of every group exactly once, with the group's token type."""
    layout = batch.layout
    rows = [s.num_rows for s in batch.history.values()] + [s.num_rows for s in batch.realtime.values()]
    rows += [s.num_rows for s in batch.scenarios.values()]
    kinds = [TOKEN_H] * len(batch.history) + [TOKEN_R] * len(batch.realtime) + [TOKEN_T] * len(batch.scenarios)
    n = layout.group_ids.shape[0]
    if layout.token_type.shape[0] != n or layout.source_row.shape[0] != n or int(layout.offsets[-1]) != n:
        raise ValueError(f"token layout: group_ids, token_type, source_row and offsets[-1] disagree on the token count ({n})")
    if n == 0:
        if sum(rows):
            raise ValueError(f"token layout is empty but the batch holds {sum(rows)} rows")
        return
    if int(layout.group_ids.min()) < 0 or int(layout.group_ids.max()) >= len(batch_groups):
        raise ValueError(f"token layout: group ids outside [0, {len(batch_groups)}) (the batch's groups: {batch_groups})")
    device = layout.group_ids.device
    counts = torch.bincount(layout.group_ids, minlength=len(batch_groups)).tolist()
    wrong = [(g, c, r) for g, c, r in zip(batch_groups, counts, rows) if c != r]
    if wrong:
        raise ValueError("token layout: tokens per group differ from the group's rows: " + ", ".join(
            f"{g}: {c} tokens, {r} rows" for g, c, r in wrong))
    kind = torch.tensor(kinds, dtype=torch.long, device=device)[layout.group_ids]
    if bool((kind != layout.token_type).any()):
        i = int(torch.nonzero(kind != layout.token_type)[0])
        group = batch_groups[int(layout.group_ids[i])]
        raise ValueError(f"token layout: token {i} of group {group} has token type {int(layout.token_type[i])}")
    size = torch.tensor(rows, dtype=torch.long, device=device)[layout.group_ids]
    if bool(((layout.source_row < 0) | (layout.source_row >= size)).any()):
        i = int(torch.nonzero((layout.source_row < 0) | (layout.source_row >= size))[0])
        raise ValueError(f"token layout: token {i} points at row {int(layout.source_row[i])} of a group with {int(size[i])} rows")


class MTFM(MTFMBase):
    """The full multi-scenario model, built from a data schema and a model config."""

    def __init__(self, schema: DataSchema, config: ModelConfig) -> None:
        fields = embedding_fields(schema)
        embeddings = FeatureEmbeddings(fields, config.embedding_dim, config.numeric_dim)

        def tokenizer(in_dim: int) -> MLP:
            return MLP(in_dim, config.tokenizer_hidden, config.d_model, config.dropout)

        history = nn.ModuleDict({s.name: tokenizer(embeddings.out_dim(f"H:{s.name}")) for s in schema.history})
        realtime = nn.ModuleDict({s.name: tokenizer(embeddings.out_dim(f"R:{s.name}")) for s in schema.realtime})
        scenarios = nn.ModuleDict()
        for sc in schema.scenarios:
            width = sum(embeddings.out_dim(f) for f in _scenario_fields(sc.name, fields))
            scenarios[sc.name] = tokenizer(width)
        groups = schema.token_groups()
        target_groups = [f"T:{s}" for s in schema.scenario_names]
        # content_match without a table shared by a scenario and a sequence has nothing to compare: the
        # model runs without it (the sharing plan that prepare and train print says so; content_links is empty)
        links = link_tables(embeddings) if config.content_match else []
        stack = HTAStack(config, groups, target_groups, link_widths(embeddings, links))
        final_norm = GroupLayerNorm(target_groups, config.d_model, config.layer_norm_eps) if config.final_norm else None
        head = MMoE(config, {s.name: s.task_names for s in schema.scenarios})
        super().__init__(schema, config, embeddings, history, realtime, scenarios, stack, final_norm, head, links)
        if config.similarity_init:
            tokenizers = [(history[s.name], [f"H:{s.name}"]) for s in schema.history]
            tokenizers += [(realtime[s.name], [f"R:{s.name}"]) for s in schema.realtime]
            tokenizers += [
                (scenarios[sc.name], _scenario_fields(sc.name, fields))
                for sc in schema.scenarios
            ]
            similarity_init(self, tokenizers)

    def scenario_subgraph(self, name: str) -> "ScenarioSubgraph":
        """The inference path of scenario ``name``, sharing this model's weights."""
        return ScenarioSubgraph(self, name)


class ScenarioSubgraph(MTFMBase):
    """One scenario's forward path (paper 3.1, 3.3.3): only its tokenizer, GLN group and heads.

    It shares (does not copy) the full model's parameters; its ``state_dict`` holds only what
    this scenario uses. Its forward takes a batch holding only this scenario.
    """

    def __init__(self, model: MTFM, name: str) -> None:
        schema = model.schema.restrict([name])
        groups = schema.token_groups()
        target_groups = [f"T:{name}"]
        fields = list(embedding_fields(schema))
        super().__init__(
            schema,
            model.config,
            model.embeddings.subset(fields),
            nn.ModuleDict(dict(model.history_tokenizers.items())),
            nn.ModuleDict(dict(model.realtime_tokenizers.items())),
            nn.ModuleDict({name: model.scenario_tokenizers[name]}),
            model.stack.subset(groups, target_groups),
            model.final_norm.subset(target_groups) if model.final_norm is not None else None,
            model.head.subset(name),
            model.content_links,
        )
        self.scenario = name
