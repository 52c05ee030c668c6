"""The softmax regression of *Dive into Deep Learning* (section 3.6): :mod:`.data` loads the images, :mod:`.model` trains it."""
