"""``mtfm export``: one scenario of a trained run as a deployable torch.export / AOTInductor / ONNX artifact."""

from __future__ import annotations

import argparse

from mtfm.train.evaluate import CHECKPOINT_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="one scenario's subgraph as a deployable artifact (torch.export, AOTInductor, ONNX)",
        description="Write scenario S of RUN as a directory OUT holding only that scenario's modules (its tokenizer, "
        "GLN groups and heads, plus the shared sequence tokenizers, attention and experts) as one request graph: "
        "program.pt2 (torch.export; always), aoti.pt2 (--aoti: compiled ahead of time by AOTInductor, needs a C++ "
        "compiler), model.onnx (--onnx: needs the export extra), request.json (the graph's inputs, tasks, "
        "provenance and the parity measured) and data_manifest.json (encodings, to build requests from raw rows). "
        "Every runtime written is checked against eager PyTorch on users of the data's test split; the command "
        "fails if a logit differs by more than 1e-4. Load it with mtfm.serve.artifact.ExportedScenario.load(OUT, "
        "runtime).")
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train` (arch mtfm)")
    p.add_argument("--scenario", metavar="S", required=True, help="the scenario to export")
    p.add_argument("--out", metavar="OUT", required=True, help="output directory (refused if it exists and is not "
                   "empty, unless --overwrite replaces an earlier export there)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="prepared data directory (default: the one the run records)")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="best: the scenario's own best epoch (default); best-overall; last")
    p.add_argument("--aoti", action="store_true", help="also compile the program with AOTInductor (aoti.pt2; "
                   "takes a minute or more)")
    p.add_argument("--onnx", action="store_true", help="also convert the program to ONNX (model.onnx; needs "
                   "pip install 'mtfm[export]')")
    p.add_argument("--parity-requests", type=int, default=64,
                   help="test-split users whose requests check every runtime against eager PyTorch (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.add_argument("--allow-other-data", action="store_true",
                   help="export although DIR is not the data RUN was trained on (its fingerprint differs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtfm.serve.artifact import export_run

    if args.parity_requests < 1:
        raise ValueError(f"--parity-requests must be >= 1, got {args.parity_requests}")
    runtimes = ("program",) + (("aoti",) if args.aoti else ()) + (("onnx",) if args.onnx else ())
    meta = export_run(args.run, args.scenario, args.out, data_dir=args.data, checkpoint=args.checkpoint,
                      runtimes=runtimes, parity_requests=args.parity_requests, overwrite=args.overwrite,
                      allow_other_data=args.allow_other_data)
    share = meta["parameters"] / meta["source"]["model_parameters"]
    print(f"wrote {args.out}: scenario {meta['scenario']} ({', '.join(meta['tasks'])}), {meta['parameters']:,} "
          f"parameters ({share:.0%} of the run's model), files {', '.join(meta['files'])}")
    for runtime in runtimes:
        check = meta["parity"][runtime]
        print(f"  {runtime}: {check['requests']} requests, {check['candidates']} candidates, max |logit - eager| "
              f"{check['max_abs_logit_diff']:.2e}")
    return 0
