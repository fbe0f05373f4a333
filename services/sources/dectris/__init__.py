"""DECTRIS detectors (EIGER2, ARINA, QUADRO, PILATUS4) through SIMPLON stream v2.

stream2: one ZeroMQ message <-> a Start, Image or End message; ingest: the bare receive-and-decode
loop (the ingest benchmark's baseline); dcu: `detstream dcu`, a detector control unit stand-in that
serves stream v2 from recorded messages or from the simulator.
"""
