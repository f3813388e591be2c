"""training: code that trains the face-embedding models facecore later runs through ONNX.

Torch lives only here (the `train` extra); facecore and the services never import it.
"""
