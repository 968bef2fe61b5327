"""What the tests share and are not tests themselves.

    configs          small_config (a seconds-long MNIST-1D config) and overrides (its --key=value form)
    launch           BIN, launcher_cmd, needs_launcher, run_launched: ranks under real horovodrun and mpirun
    dist_worker      run by the launchers: train and save every step of every rank (tests/test_distributed.py)
    measure_worker   run by the launchers: sharpness, Fisher norms, gradient variances (tests/test_measure.py)
    smoke_worker     run by horovodrun: smoke variants of presets in one launcher world
    slurm            a private Slurm (munged, slurmctld, slurmd) on this machine (tests/test_slurm.py)
    fingerprint      fixed-seed fingerprints of every regime, to show a refactor bit-identical (by hand)

Pytest's hooks and fixtures stay in tests/conftest.py.
"""
