"""The one owner of the output folder: where each artifact lives and what it is called (`layout`), what made it
(`provenance`: the fingerprint of config values, input files and upstream artifacts), and its record read back and
judged current, stale or missing (`artifacts`). Every other module gets names, records and scores from here.
"""
