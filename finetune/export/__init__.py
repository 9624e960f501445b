"""After training: write the merged model as an HF directory or as a GGUF file (+ an Ollama Modelfile).

``finetune.export.gguf_file`` writes GGUF with the ``gguf`` package's writer, ``finetune.export.ollama``
the Modelfile beside it, ``finetune.export.runner`` is what ``export.py`` runs.
"""
