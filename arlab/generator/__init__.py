"""The AR generator: model (embedding, shuffle, order, backbone, head), sampling, training task."""
