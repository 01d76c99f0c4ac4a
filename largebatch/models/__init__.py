"""Models, built from configs (no weights are downloaded); each task (``largebatch.tasks``) builds its own.

Every model's forward takes a micro-batch and returns {"loss_sum", "count"[, "correct"]}: the loss
SUMMED over the batch's ``count`` targets, so the trainer can normalise by a global count.

    bert             BERT masked-LM, head at masked positions only          largebatch.models.bert
    lstm_lm          Zaremba et al. 2014's word-level LSTM language model    largebatch.models.lstm_lm
    lstm_classifier  an LSTM over the rows of an image (LEGW's MNIST-LSTM)   largebatch.models.lstm_classifier
"""
