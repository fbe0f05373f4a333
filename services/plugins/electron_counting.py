"""Electron counting as stempy does it: dark subtraction, thresholds, strict 3x3 local maxima.

Parameters (all optional):
  dark                 "simulated" (the simulator's own dark reference; default for simulator
                       sources), "none" (default otherwise) or a path to a .npy dark reference (on
                       Kubernetes: a file on the output volume claim, which workers mount read-only)
  backgroundThreshold  fixed thresholds (give both); without them they are fitted, as stempy fits them,
  xrayThreshold        from the session's first scan's first `samples` frames, the same frames for every
                       worker, so one threshold set counts the whole session, run after run
  samples              frames sampled for the thresholds (default 40)
The thresholds used (fixed or fitted, with the fit's statistics) are recorded in each scan's file as
stempy records them, `metadata/electron_counting`.
  backgroundSigma      background threshold = fitted mean + n sigma (default 4)
  xraySigma            X-ray threshold = fitted mean + n sigma (default 10)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detstream.services.model.schema import did_you_mean
from detstream.services.plugins import Plugin, check_number
from detstream.services.plugins.counting import Counter, ThresholdFit, Thresholds, fit_thresholds
from detstream.services.sources.simulator import dark_reference

KNOWN = ("dark", "backgroundThreshold", "xrayThreshold", "samples", "backgroundSigma", "xraySigma")


class ElectronCounting(Plugin):
    result = "events"
    dtypes = ("uint8", "uint16", "uint32")  # float frames: stempy casts them to uint16, wrapping; not here

    @classmethod
    def check_params(cls, params):
        problems = [(key, f"unknown parameter{did_you_mean(key, KNOWN)}; allowed: {', '.join(KNOWN)}")
                    for key in params if key not in KNOWN]
        for key in ("backgroundThreshold", "xrayThreshold", "backgroundSigma", "xraySigma"):
            check_number(params, key, 0, problems)
        check_number(params, "samples", 1, problems, integer=True)
        if ("backgroundThreshold" in params) != ("xrayThreshold" in params):
            problems.append(("xrayThreshold" if "backgroundThreshold" in params else "backgroundThreshold",
                             "fixed thresholds need both backgroundThreshold and xrayThreshold"))
        dark = params.get("dark", "none")
        if not isinstance(dark, str):
            problems.append(("dark", f"must be 'simulated', 'none' or a path to a .npy file; got {dark!r}"))
        return problems

    @classmethod
    def files(cls, params):
        dark = params.get("dark", "none")
        return {} if dark in ("none", "simulated") else {"dark": dark}

    @classmethod
    def samples(cls, params):
        return 0 if "backgroundThreshold" in params else int(params.get("samples", 40))

    def configure(self, params):
        super().configure(params)
        spec = self.context.spec
        default_dark = "simulated" if spec.source.kind == "simulator" else "none"
        self.dark = self.load_dark(params.get("dark", default_dark))
        self.fit: ThresholdFit | None = None
        if "backgroundThreshold" in params:
            self.thresholds = Thresholds(float(params["backgroundThreshold"]), float(params["xrayThreshold"]))
            self.counter = Counter(self.dark, self.thresholds, self.context.frame_shape)
        else:
            self.thresholds = self.counter = None
        self.samples_wanted = self.samples(params)

    def load_dark(self, dark: str) -> np.ndarray | None:
        rows, cols = self.context.frame_shape
        if dark == "none":
            return None
        if dark == "simulated":
            sim = self.context.spec.source.simulator
            return dark_reference(sim.seed, rows, cols, sim.dark_level)
        path = Path(dark)
        if not path.is_file():
            raise ValueError(f"dark reference {dark} does not exist")
        array = np.load(path)
        if array.shape != (rows, cols):
            raise ValueError(f"dark reference {dark} has shape {array.shape}, frames are {(rows, cols)}")
        return array.astype(np.float32)

    def calibrate(self, samples):
        frames = np.stack([np.hstack(sectors) for sectors in samples])
        p = self.params
        self.fit = fit_thresholds(frames, self.dark, float(p.get("backgroundSigma", 4.0)),
                                  float(p.get("xraySigma", 10.0)))
        self.thresholds = self.fit.thresholds
        self.counter = Counter(self.dark, self.thresholds, self.context.frame_shape)
        self.samples_wanted = 0

    def calibration(self):
        if self.fit is not None:
            return {"electron_counting": self.fit.metadata()}
        if self.thresholds is not None:
            return {"electron_counting": {"threshold_calculated": False,
                                          "background_threshold": self.thresholds.background,
                                          "x_ray_threshold": self.thresholds.xray}}
        return {}

    def process(self, sectors, parts):
        return [self.counter.count_sectors(sectors)]
