// The demo app's logic, in plain Kotlin with no Android import, so that CI
// compiles and runs it against the generated bindings (scripts/kotlin.sh);
// the Compose screens only draw what it returns.
package org.nextquill.demo.core

import java.util.concurrent.atomic.AtomicBoolean
import kotlin.math.abs
import org.nextquill.EngineConfig
import org.nextquill.Flow
import org.nextquill.GenerateOptions
import org.nextquill.GenerationResult
import org.nextquill.HistoryItem
import org.nextquill.ImportSummary
import org.nextquill.NextquillEngine
import org.nextquill.TextListener
import org.nextquill.TrainEvent
import org.nextquill.TrainListener
import org.nextquill.TrainOptions
import org.nextquill.TrainResult
import org.nextquill.UserSummary

/** One token of a heatmap: its text and how strongly the history caused it. */
data class HeatCell(
    val text: String,
    /** Δp of the token: its probability with the history minus without. */
    val deltaP: Float,
    /** Δp scaled into [-1, 1] by the text's largest |Δp|: the colour's strength and sign. */
    val intensity: Float,
    /** Whether Δp passed the method's threshold δ (drawn with an outline). */
    val preferenceBearing: Boolean,
)

/** A text and its preference heatmap. */
data class Heatmap(val itemId: String, val cells: List<HeatCell>, val preferenceBearingShare: Float)

/** What the "personalize now" progress bar shows. */
data class TrainingProgress(val step: Long, val totalSteps: Long, val loss: Float, val etaSeconds: Double) {
    /** Share of the run done, in [0, 1]. */
    val fraction: Float get() = if (totalSteps == 0L) 0f else step.toFloat() / totalSteps.toFloat()
}

/** Generic and personalized text for the same request, side by side. */
data class Comparison(val generic: GenerationResult, val personalized: GenerationResult)

/**
 * Everything the demo's screens ask of the engine. Methods block: call them
 * off the UI thread. [cancelTraining] may be called from any thread.
 */
class DemoController(val engine: NextquillEngine) : AutoCloseable {
    private val cancelRequested = AtomicBoolean(false)

    companion object {
        /** Opens the engine with phone-friendly settings: 2 threads, short prompts. */
        fun open(databasePath: String, modelPath: String): DemoController {
            val config = EngineConfig(threads = 2u, maxHistoryItems = 4u, maxResponseTokens = 64u)
            return DemoController(NextquillEngine.open(databasePath, modelPath, config))
        }
    }

    /** Fills an empty store with the bundled made-up users; null when it had users already. */
    fun seedIfEmpty(jsonl: String): ImportSummary? =
        if (engine.users().isEmpty()) engine.importJsonl(jsonl) else null

    fun users(): List<UserSummary> = engine.users()

    fun history(userId: String): List<HistoryItem> = engine.history(userId)

    /** The heatmap of one of the user's texts. */
    fun heatmap(userId: String, itemId: String): Heatmap {
        val explanation = engine.explain(userId, itemId)
        val scale = explanation.tokens.maxOfOrNull { abs(it.deltaP) }?.takeIf { it > 0f } ?: 1f
        val cells = explanation.tokens.map {
            HeatCell(it.text, it.deltaP, (it.deltaP / scale).coerceIn(-1f, 1f), it.preferenceBearing)
        }
        return Heatmap(itemId, cells, explanation.preferenceBearingShare)
    }

    /**
     * Trains the user's adapter ("personalize now"), reporting each step to
     * [onProgress]. [cancelTraining] ends it after the current step; the
     * result's outcome is then `STOPPED` and the previous adapter stays active.
     */
    fun personalize(
        userId: String,
        options: TrainOptions = TrainOptions(),
        onProgress: (TrainingProgress) -> Unit,
    ): TrainResult {
        cancelRequested.set(false)
        val listener = object : TrainListener {
            override fun onEvent(event: TrainEvent): Flow {
                if (event is TrainEvent.Step) {
                    onProgress(
                        TrainingProgress(
                            event.step.toLong(), event.totalSteps.toLong(), event.loss, event.etaSeconds,
                        ),
                    )
                }
                return if (cancelRequested.get()) Flow.STOP else Flow.CONTINUE
            }
        }
        return engine.train(userId, options, listener)
    }

    /** The cancel button: the running [personalize] stops after its current step. */
    fun cancelTraining() = cancelRequested.set(true)

    /**
     * Generic text (no history, base model), then the user's (their history and
     * adapter), each streamed to its callback as it is produced.
     */
    fun compare(
        userId: String,
        request: String,
        maxTokens: UInt = 60u,
        onGeneric: (String) -> Unit = {},
        onPersonalized: (String) -> Unit = {},
    ): Comparison {
        val options = GenerateOptions(maxTokens = maxTokens)
        val generic = engine.generate(null, request, options, streamTo(onGeneric))
        val personalized = engine.generate(userId, request, options, streamTo(onPersonalized))
        return Comparison(generic, personalized)
    }

    private fun streamTo(sink: (String) -> Unit) = object : TextListener {
        override fun onText(text: String): Flow {
            sink(text)
            return Flow.CONTINUE
        }
    }

    override fun close() = engine.close()
}
