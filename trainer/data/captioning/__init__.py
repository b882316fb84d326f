"""Auto-captioning: write ``name.txt`` captions for a folder of pictures with a model.

``tagger`` runs a booru-style WD14 tagger (an ONNX model plus ``selected_tags.csv``) with
onnxruntime; ``captioner`` runs any transformers image-to-text model (BLIP, Florence-2, ...);
``autocaption`` walks a dataset folder in batches and writes the captions in one of three modes
(skip pictures that have one, append, overwrite), every change recorded in the dataset's caption
undo (``trainer.data.caption_undo``). Imports: ``trainer.core``, ``trainer.config`` and the rest
of ``trainer.data``, plus onnxruntime/transformers, loaded only when a model is opened.
"""
