"""What every program does with a ZTF alert, in one place: container framing (``framing``), Avro
decoding with a fast and a general path (``decoder``), stamps to 2x21x21 crops (``cutouts``), the
whole message step (``message``), the named errors of bad input (``errors``), reading alert
files, folders and archives (``files``) and valid synthetic alerts (``synthetic``).

Pure functions and plain data only: no Kafka, no Redis, no torch. The consumer, the trainer and the
benchmark import it; it imports nothing from them (tests/unit/test_import_graph.py).
"""
