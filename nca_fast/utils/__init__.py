"""Helpers shared across the package: argument checks (``checks``), bounded reads and atomic writes
(``files``), the native weights format (``weights_file``), spec JSON (``jsonspec``) and optional
dependencies (``optional``)."""
