"""What a build leaves behind: staging, verification and publish, the manifest check, the
build history with the image locks, and retention.

The output folder's layout (`output/<image>/`, `builds/<id>/`, `.staging/`) is written and read
only through these modules.
"""
