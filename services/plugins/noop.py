"""The noop plugin: passes each frame's buffers on untouched (for measuring the framework)."""

from detstream.services.plugins import Plugin


class Noop(Plugin):
    result = "frames"

    @classmethod
    def check_params(cls, params):
        return [(key, "noop takes no parameters") for key in params]

    def process(self, sectors, parts):
        return parts
