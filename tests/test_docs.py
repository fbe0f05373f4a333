"""The docs say what the code does: phases, conditions, stage states, metric names and chart defaults
in README.md and the chart's NOTES.txt, compared with the code that defines them."""

import re

import yaml

from detstream.operator.crd import PHASES
from detstream.operator.status import Observed, status_patch
from detstream.services.runtime.metrics import Counters, StageMetrics
from detstream.v1.control_pb2 import StageState

from helpers import ROOT

README = (ROOT / "README.md").read_text()
NOTES = (ROOT / "charts" / "detstream" / "templates" / "NOTES.txt").read_text()
CHART = ROOT / "charts" / "detstream"


def without_parentheses(text: str) -> str:
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\([^()]*\)", "", text)
    return text


def test_the_phases_named_are_the_operators():
    bullet = re.search(r"- \*\*Phases\*\*: (.*?)\n- \*\*", README, re.S).group(1)
    assert [p.strip(" .\n") for p in without_parentheses(bullet).split(",")] == list(PHASES)
    chains = re.findall(r"\w+(?: -> \w+)+", README + NOTES)
    assert len(chains) >= 2, "README and NOTES.txt each show how a session goes"
    for chain in chains:
        steps = chain.split(" -> ")
        assert set(steps) <= set(PHASES), chain
        assert steps == sorted(steps, key=PHASES.index), chain
    assert re.findall(r"\b(Running|Completed|Done|Error)\b", NOTES) == []


def test_the_conditions_named_are_the_ones_written():
    written = [c["type"] for c in status_patch(Observed(desired={"worker": 1}), {}, 1, "")["conditions"]]
    named = re.search(r"`conditions` \(([^)]*), each with", README).group(1).split(", ")
    assert named == written


def test_the_stage_states_are_the_protobuf_enum():
    row = next(line for line in README.splitlines() if line.startswith("| `detstream_stage_state`"))
    registry = StageMetrics(Counters(), "s", "writer", 0).registry
    (family,) = [f for f in registry.collect() if f.name == "detstream_stage_state"]
    for text in (row, family.documentation):
        states = {int(n): word for n, word in re.findall(r"\b(\d) (\w+)", text)}
        assert sorted(states) == sorted(StageState.values()), text
        assert all(word == StageState.Name(n).lower() for n, word in states.items() if n), text


def test_the_metrics_table_lists_every_stage_metric():
    registry = StageMetrics(Counters(), "s", "writer", 0).registry
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    table = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    named = {name for line in table.splitlines() if line.startswith("| `")
             for name in re.findall(r"`(detstream_\w+)", line.split("|")[1])}
    assert named == exported


def test_the_chart_values_table_gives_the_chart_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    section = README.split("## Deploying with Helm", 1)[1]
    table = [line for line in section.split("\n\n") if line.startswith("| value |")][0]
    checked = 0
    for line in table.splitlines()[2:]:
        keys, defaults = (re.findall(r"`([^`]*)`", cell) for cell in line.split("|")[1:3])
        if len(keys) != len(defaults) or not keys:
            continue  # a default described in words (e.g. "the release namespace")
        for key, default in zip(keys, defaults):
            value = values
            for part in key.split("."):
                value = value[part]
            assert yaml.safe_load(default) == value, key
            checked += 1
    assert checked >= 6
