//! Wire types shared by the skymesh controller and agent.
