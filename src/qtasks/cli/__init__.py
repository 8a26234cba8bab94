"""The `qtasks` command line, in three layers.

`main.py` parses argv (with click) into the dataclasses of `args.py`; `commands.py` acts on
them through runtime functions that never see argv (`AsyncQueueTasks.serve`,
`qtasks.runtime.supervisor`); `loader.py` finds the app that `-A module:app` names.
"""
