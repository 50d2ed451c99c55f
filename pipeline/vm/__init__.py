"""Run, reach, stop and boot-test images in QEMU, one concern per module:

    argv        the QEMU command line (pure)
    state       a VM's state folder (an instance's, output/<image>/boot-test/), its process, its SSH port
    qmp         the QMP client (status, power-off, quit)
    ssh         waiting for sshd, pinning the guest's host keys, strict ssh
    lifecycle   what to boot, start, stop, accelerator and firmware
    boottest    the boot test (a published or a staged build) and its results table
    instances   named instances: an overlay on one build, its record, ports, rebase, rm, listing
    seed        an instance's NoCloud seed (hostname, keys, user-data, the shares' boot script)
    shares      shared folders: virtiofs or 9p, virtiofsd
    idle        the idle watcher (`--idle-stop`)
    console     `invoke console`: the serial console on this terminal
    on_builder  instances on a builder (`run --on`), reached from here

Import the module you need (`from pipeline.vm import lifecycle`): this package imports nothing
itself, so `pipeline.vm` stays cheap for callers that only check it is installed.
"""
