"""Training: the typed configuration and presets (:mod:`.config`), the loss (:mod:`.losses`, plain L2
or cryoAI's symmetric loss), the loop with checkpoints and resume (:mod:`.trainer`), pose prediction
(:mod:`.predict`), map export and plots (:mod:`.export`), and a whole run (:mod:`.run`)."""
