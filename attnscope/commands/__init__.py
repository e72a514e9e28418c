"""One module per command: `run(config, ui) -> result`; the only place that orchestrates a
whole job and writes its run folder."""
