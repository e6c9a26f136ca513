"""``edge-vlm chat``: a Textual app to talk about images in the terminal, in-process.

The plain-Python parts (:mod:`~edge_vlm.tui.conversation`, :mod:`~edge_vlm.tui.paths`,
:mod:`~edge_vlm.tui.clipboard`, :mod:`~edge_vlm.tui.commands`) import neither Textual nor
llama.cpp; :mod:`~edge_vlm.tui.app` is the Textual app built on them.
"""
