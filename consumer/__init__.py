"""The consumer daemon: the main loop, its sinks, inference, metrics and CLI (`consumer run | replay | peek`)."""
