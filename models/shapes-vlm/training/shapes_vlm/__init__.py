"""``shapes-vlm``: the small vision-language model edge-vlm ships, and how it was made.

This package lives beside the model's files (``models/shapes-vlm/training/``), not in the
runtime: answering needs only the GGUF files.

* :mod:`~shapes_vlm.world` - the synthetic world (scenes, questions, answers);
  :mod:`~shapes_vlm.render` draws a scene (Pillow only);
* :mod:`~shapes_vlm.vocab` - vocabulary, special tokens, chat template;
* :mod:`~shapes_vlm.data` - letterboxing, the pre-rendered bank, token sequences;
* :mod:`~shapes_vlm.evaluate` - accuracy through edge-vlm's public API (no torch;
  ``edge-vlm eval`` runs it from a checkout);
* :mod:`~shapes_vlm.model`, :mod:`~shapes_vlm.lmdata`, :mod:`~shapes_vlm.train`,
  :mod:`~shapes_vlm.export` (GGUF through the ``gguf`` library), :mod:`~shapes_vlm.parity` -
  the training side (``pip install -e ".[train]"``: PyTorch).
"""
