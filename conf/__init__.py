"""The Hydra config tree, installed as the package ``alignlab_conf`` (see setup.py); yaml files only."""
