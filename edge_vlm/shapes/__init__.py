"""``shapes-vlm``: the small vision-language model edge-vlm trains, exports and ships itself.

* :mod:`~edge_vlm.shapes.world` - the synthetic world (scenes, rendering, questions), Pillow only;
* :mod:`~edge_vlm.shapes.vocab` - vocabulary, special tokens, chat template;
* :mod:`~edge_vlm.shapes.data` - letterboxing, the pre-rendered bank, token sequences;
* :mod:`~edge_vlm.shapes.evaluate` - accuracy through the public API (no torch);
* :mod:`~edge_vlm.shapes.model`, :mod:`~edge_vlm.shapes.train`, :mod:`~edge_vlm.shapes.export`,
  :mod:`~edge_vlm.shapes.parity` - training side (need torch: ``pip install edge-vlm[train]``).
"""
