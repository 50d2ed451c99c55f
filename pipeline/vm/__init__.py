"""Run, reach, stop and boot-test images in QEMU, one concern per module:

    argv       the QEMU command line (pure)
    state      a VM's state folder (output/<image>/run/), its process and its SSH port
    qmp        the QMP client (status, power-off, quit)
    ssh        waiting for sshd, pinning the guest's host keys, strict ssh
    lifecycle  what to boot, start, stop, accelerator and firmware
    boottest   the boot test (a published or a staged build) and its results table

Import the module you need (`from pipeline.vm import lifecycle`): this package imports nothing
itself, so `pipeline.vm` stays cheap for callers that only check it is installed.
"""
