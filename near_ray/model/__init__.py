"""The model front door: the CLIP factory (``clip``) and the model bundle (``bundle``).

``create_clip(ModelConfig)`` builds the CLIP a run names (an open_clip architecture with a pretrained
tag, a config shipped in ``near_ray/model/configs``, or safetensors weights on storage);
``load_bundle(uri)`` loads a trained classifier without the trainer. Model configs are data
(``configs/*.json``). Importing this package imports neither torch nor open_clip.
"""
