"""The ``sora-fast`` subcommands that hold more than a call: ``train`` (a run directory from a run file) and
``generate`` (prompts, conditions, edits and long rollouts to files). ``sora_fast.cli`` parses and dispatches."""
