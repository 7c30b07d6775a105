"""`shammah serve`: the engine, feedback loop, adapters and training jobs over HTTP."""
