"""Integration with MACE's ``mace_run_train``: flags, validation, the patches of MACE's seams, the plugin entry point.

Imports nothing on purpose: the interpreter start-up hook imports :mod:`.state` in every Python process, and
this package's ``__init__`` runs first. The modules, each importing only those listed before it:
:mod:`.state` → :mod:`.arguments`, :mod:`.run_guards`, :mod:`.e0_check`, :mod:`.input_checks`,
:mod:`.run_hooks` → :mod:`.validation` → :mod:`.patching`, :mod:`.seams`, :mod:`.distributed` →
:mod:`.mace_plugin` → :mod:`.entry` → :mod:`.train_cli`.
"""
