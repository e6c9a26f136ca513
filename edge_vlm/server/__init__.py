"""``edge-vlm serve``: the chat-completion API (OpenAI / Hugging Face) on the user's machine.

Standard library HTTP only (``http.server``), so the edge install stays light. The parts,
one job per module:

- :mod:`.app`: the HTTP server, the per-request handler and the routes;
- :mod:`.exchange`: one request/response pair (body reading with a byte cap, JSON, errors);
- :mod:`.handlers`: the endpoints; :mod:`.generate`: running one chat completion;
- :mod:`.models`: which models are loaded, loading state, the per-model queue;
- :mod:`.auth`, :mod:`.limits`, :mod:`.media`, :mod:`.cache`, :mod:`.sse`, :mod:`.watch`.

Nothing is imported here: ``edge_vlm.server.cli`` is imported for ``edge-vlm --help``.
"""
