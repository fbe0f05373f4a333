"""The `detstream` command: run a session locally, run one stage, check a manifest."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from detstream.services.model.plan import ROLES
from detstream.services.model.schema import SpecError
from detstream.services.model.session import load_session


def build_parser() -> argparse.ArgumentParser:
    """The `detstream` command line: run, validate, stage, and the commands other packages add."""
    parser = argparse.ArgumentParser(prog="detstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a StreamingSession locally as processes on 127.0.0.1")
    run.add_argument("manifest", type=Path, help="a StreamingSession YAML file")
    run.add_argument("--output", type=Path, default=Path("out"), help="folder for results (default: out)")
    run.add_argument("--report", type=Path, help="also write the summary as JSON to this file")
    run.add_argument("--quiet", action="store_true", help="no live progress display")

    check = sub.add_parser("validate", help="check a StreamingSession manifest and print its plan")
    check.add_argument("manifest", type=Path)

    stage = sub.add_parser("stage", help="run one pipeline stage (the launchers call this)")
    stage.add_argument("role", choices=ROLES)
    stage.add_argument("--plan", type=Path, help="the session's plan.json (the launchers give it)")
    stage.add_argument("--manifest", type=Path,
                       help="source outside the session (an acquisition machine): the session's manifest")
    stage.add_argument("--connect", action="append", default=[],
                       help="source outside the session: a distributor's route address, one per lane, e.g. "
                            "tcp://demo-distributor-0.facility.example:7200 (see the session's status.ingest)")
    stage.add_argument("--replay", help="external source: replay frames from this .npy/HDF5 file instead of "
                                        "simulating them")
    stage.add_argument("--dataset", default="", help="external source: the HDF5 dataset to replay")
    stage.add_argument("--index", type=int, default=None,
                       help="replica index (default: $DETSTREAM_INDEX, or the pod name's ordinal)")
    stage.add_argument("--bind", default=os.environ.get("POD_IP"),
                       help="address to listen on (default: $POD_IP, else the plan's host)")
    stage.add_argument("--output", type=Path, help="writer: results folder")
    stage.add_argument("--log-level", default="INFO")

    for command in entry_points(group="detstream.commands"):  # e.g. `detstream operator`
        command.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "run"):
            return args.run(args)
        if args.command == "run":
            from detstream.services.launcher.runner import run_session
            return run_session(args.manifest, args.output, args.report, quiet=args.quiet)
        if args.command == "validate":
            return validate(args.manifest)
        return run_stage(args)
    except SpecError as exc:
        print(f"detstream: {args.manifest if hasattr(args, 'manifest') else 'plan'} is not a valid "
              f"StreamingSession:", file=sys.stderr)
        for error in exc.errors:
            print(f"  - {error}", file=sys.stderr)
        return 2


def validate(path: Path) -> int:
    from detstream.services.model.plan import LocalNetwork, build_plan
    from detstream.services.model.session import read_manifest

    session = read_manifest(path)
    plan = build_plan(session, LocalNetwork(iter(range(20000, 30000))))
    print(f"{path}: valid StreamingSession {session.name!r}; stages: "
          + ", ".join(s.name for s in plan.stages))
    return 0


def stage_index(explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    if "DETSTREAM_INDEX" in os.environ:
        return int(os.environ["DETSTREAM_INDEX"])
    ordinal = os.environ.get("POD_NAME", "").rsplit("-", 1)[-1]
    return int(ordinal) if ordinal.isdigit() else 0


def run_stage(args) -> int:
    from detstream.services.model.plan import Plan
    from detstream.services.stages import stage_class

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cls = stage_class(args.role)
    if args.connect:
        return run_external_source(args, cls)
    if args.plan is None:
        print("detstream stage: --plan is required (or, for a source outside the session, "
              "--manifest and --connect)", file=sys.stderr)
        return 2
    try:
        plan = Plan.read(args.plan)
    except (OSError, ValueError) as exc:
        print(f"detstream stage: cannot read the plan {args.plan}: {exc}", file=sys.stderr)
        return 2
    extra = {"output": args.output} if args.role == "writer" else {}
    return cls(plan, stage_index(args.index), bind_host=args.bind, **extra).run()


def run_external_source(args, cls) -> int:
    """A source on an acquisition machine, joining a running session through its ingest addresses."""
    from detstream.services.dataplane.wire import is_tcp_address
    from detstream.services.launcher.runner import free_ports
    from detstream.services.model.plan import LocalNetwork, build_plan
    from detstream.services.model.session import read_manifest

    if args.role != "source" or args.manifest is None:
        print("detstream stage: --connect is for `stage source --manifest SESSION.yaml`", file=sys.stderr)
        return 2
    wrong = [a for a in args.connect if not is_tcp_address(a)]
    if wrong:
        print(f"detstream stage source: --connect {wrong[0]}: give the address as tcp://HOST:PORT (PORT 1 to "
              f"65535), as the session's status.ingest lists it", file=sys.stderr)
        return 2
    if args.replay and not Path(args.replay).is_file():
        print(f"detstream stage source: --replay {args.replay}: no such file; give a .npy or HDF5 file of frames",
              file=sys.stderr)
        return 2
    session = read_manifest(args.manifest)
    lanes = session.spec.lanes
    if len(args.connect) != lanes:
        print(f"detstream stage source: the session has {lanes} lane(s) (spec.lanes); give one --connect "
              f"per lane, got {len(args.connect)}", file=sys.stderr)
        return 2
    source = {"kind": "replay", "path": args.replay, "dataset": args.dataset} if args.replay else {"kind": "simulator"}
    manifest = {**session.manifest, "spec": {**session.manifest["spec"],
                                             "source": {**session.manifest["spec"].get("source", {}), **source}}}
    plan = build_plan(load_session(manifest), LocalNetwork(free_ports()))
    stage = cls(plan, stage_index(args.index), bind_host="127.0.0.1", connect=args.connect)
    stage.start()  # nobody else will: send at once, and exit when every scan is sent
    return stage.run()


if __name__ == "__main__":
    sys.exit(main())
