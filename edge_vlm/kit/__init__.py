"""Offline install kits: ``edge-vlm kit build`` writes a folder that installs edge-vlm, its
llama.cpp build and models on an air-gapped machine (``install.sh``), ``kit verify`` checks
one. :mod:`edge_vlm.kit.installer` is the installer itself (standard library only: it runs
before edge-vlm is installed).
"""
